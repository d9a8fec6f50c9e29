import os

import pytest
import torch

# Tests never download anything, never open progress bars and never ask for a Ray token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller sees a finished (or dead) worker group at its next poll, every 2 s by default:
# seconds of every training job the tests run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Without a GPU, Triton kernels run in Triton's CPU interpreter (set before dllm imports them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dllm  # noqa: E402

TASK_TEXT = [
    "reverse: abcdef => fedcba", "sort: dcba => abcd", "add 12+34 => 46", "repeat x 3 => x x x",
    "spell 7 => seven", "dedupe: aabbcc => abc", "0123456789 +-=> :,.?!", "Hello world\n",
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def char_tokenizer():
    return dllm.train_tokenizer(TASK_TEXT, kind="char")


JSON_TEXT = ['{"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "no": false, "none": null}',
             '{"pi": -3.25e+2, "s": "a\\n\\"b\\u00e9c", "é": "日本", "E": 1E5}']


@pytest.fixture(scope="session")
def json_tokenizer():
    """A character vocabulary with every character the JSON tests write."""
    return dllm.train_tokenizer(TASK_TEXT + JSON_TEXT, kind="char")


def make_config(tokenizer, **overrides) -> dllm.LLaDAConfig:
    ids = dllm.special_ids(tokenizer)
    return dllm.tiny_config(len(tokenizer), **ids, **overrides)


@pytest.fixture(scope="session")
def tiny_config(char_tokenizer):
    return make_config(char_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, char_tokenizer, tiny_config):
    path = tmp_path_factory.mktemp("ckpt")
    model = dllm.build_model(tiny_config, seed=0)
    dllm.save_pretrained(model, char_tokenizer, path)
    return path


def make_confident_model(config, seed=8, scale=60.0):
    """A random model made confident (several tokens pass tau=0.9 per step) that emits EOS at varied
    points: the LM head is scaled up, and EOS takes over the head row of a token the model often
    produces. Deterministic for a given config."""
    import collections

    model = dllm.build_model(config, seed=seed)
    head = model.model.transformer["ff_out"].weight
    with torch.no_grad():
        head.mul_(scale)
    probe = dllm.Engine(model, max_batch_size=8, max_model_len=256)
    prompts = [list(range(7, 7 + n)) for n in (3, 5, 8, 11)]
    gens = probe.generate(prompts, dllm.GenerationConfig(block_size=8, max_new_tokens=32))
    counts = collections.Counter(t for g in gens for t in g.token_ids).most_common()
    token = counts[1][0] if len(counts) > 1 else counts[0][0]
    with torch.no_grad():
        head[config.eos_token_id] = head[token]
        head[token] = -head[token].abs()
    return model


@pytest.fixture(scope="session")
def confident_model(tiny_config):
    return make_confident_model(tiny_config)


TALKATIVE = {"seed": 9, "scale": 20.0}


@pytest.fixture(scope="session")
def talkative_model(tiny_config):
    """A confident model that writes answers of varied length and content under the default decoding
    (stops_last), and different ones for different sampling seeds. The confident model commits EOS at
    the first position there (its leftmost candidate): '' for every prompt, which proves nothing."""
    return make_confident_model(tiny_config, **TALKATIVE)


@pytest.fixture
def rebuild_replays():
    """watch(engine): a list that receives, for each of the engine's rebuild forwards (recompute preemption),
    how many CUDA-graph replays it ran."""
    def watch(engine) -> list[int]:
        rebuild, replays = engine._rebuild, []

        def counted(reqs):
            before = engine.graphs.replays
            rebuild(reqs)
            replays.append(engine.graphs.replays - before)

        engine._rebuild = counted
        return replays

    return watch


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole test session (starting Ray costs seconds)."""
    from pipelines.runtime import ensure_ray

    ray = ensure_ray(num_cpus=4, object_store_mb=400, dashboard=False)
    yield ray
    ray.shutdown()
