"""Serving a trained model: the model folder (:mod:`.folder`), raw-id recommendations (:mod:`.recommender`), the
MLflow pyfunc model (:mod:`.pyfunc`) and the Ray Serve deployment (:mod:`.ray_serve`). No LLM, no Ray Train."""
