"""The files that pass between eimf's layers, one module per format, each the only code that writes and reads it.

    prepared       the prepared dataset (eimf.data writes it; training, evaluation, semantic read it)
    checkpoints    the names of a training checkpoint's files (training writes them; export reads them)
    annotations    an annotation set (eimf.semantic writes it; EIMF training and the model folder read it)
    model_folder   the exported model folder (export writes it; serving and evaluation read it)

This layer sits below everything that uses it and imports only eimf.config and eimf.fs.
"""
