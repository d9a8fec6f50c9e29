"""Cluster configs: Ray's own autoscaler validation, strict KubeRay CRD schemas, consistent Serve config."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CRDS = ROOT.parent / "shared" / "kuberay-crds"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_yaml_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # no work on the head
    assert any("H100" in str(n.get("resources")) for n in nodes.values())


def test_autoscaler_validation_rejects_a_typo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["serve_1gpu"]["min_workerz"] = 1
    with pytest.raises(Exception, match="min_workerz"):
        validate_config(prepare_config(config))


def _strict(schema):
    """kubectl --validate=strict: an object with declared properties accepts no other field."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_schema(kind_file):
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    crd = yaml.safe_load((CRDS / kind_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _validate(manifest, schema):
    # Kubernetes accepts integers or strings for int-or-string fields (resource quantities).
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("manifest,crd", [("rayjob-train.yaml", "ray.io_rayjobs.yaml"),
                                          ("rayservice.yaml", "ray.io_rayservices.yaml")])
def test_kuberay_manifests_match_the_real_crd_schemas_strictly(manifest, crd):
    _validate(yaml.safe_load((CLUSTER / "kuberay" / manifest).read_text()), _crd_schema(crd))


def test_strict_validation_catches_an_unknown_field():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-train.yaml").read_text())
    doc["spec"]["entrypointz"] = "typo"
    with pytest.raises(jsonschema.ValidationError, match="entrypointz"):
        _validate(doc, _crd_schema("ray.io_rayjobs.yaml"))


def test_rayservice_embeds_the_projects_serve_config():
    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())


def test_serve_config_is_valid_for_serve_and_its_args_for_our_builder():
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    config = yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    assert config["applications"][0]["import_path"] == "serve.app:build_app"
    # every key is one build_app knows, with valid values
    assert isinstance(build_app(config["applications"][0]["args"]), Application)


@pytest.mark.parametrize("value, kept", [(False, False), ("false", False), ("True", True), ("1", True)])
def test_boolean_serve_arguments_come_from_yaml_or_the_command_line(value, kept):
    from serve.app import _flag, build_app

    assert _flag(value, "prefix_caching") is kept
    with pytest.raises(ValueError, match="prefix_caching='maybe' is not a boolean; use true or false"):
        build_app({"model": "/models/x", "prefix_caching": "maybe"})


def test_training_yaml_for_the_cluster_is_a_valid_train_config():
    from train.config import TrainConfig

    cfg = TrainConfig.from_yaml(CLUSTER / "train-llada8b.yaml")
    assert cfg.num_workers == 8 and cfg.use_gpu and cfg.seq_len == 8192


def test_page_allocation_is_checked_when_the_app_is_built():
    from serve.app import build_app

    with pytest.raises(ValueError, match="page_allocation='lazy' is not one of on_demand, reserve"):
        build_app({"model": "/models/x", "page_allocation": "lazy"})


def test_quantization_is_checked_when_the_app_is_built():
    from serve.app import build_app

    with pytest.raises(ValueError, match="quantization='int8' is not one of fp8"):
        build_app({"model": "/models/x", "quantization": "int8"})


def test_tool_call_parser_is_checked_when_the_app_is_built():
    from serve.app import build_app

    with pytest.raises(ValueError, match="tool_call_parser='mistral' is not one of hermes"):
        build_app({"model": "/models/x", "tool_call_parser": "mistral"})
    app = build_app({"model": "/models/x", "tool_call_parser": "hermes"})
    assert app._bound_deployment.init_kwargs["tool_call_parser"] == "hermes"  # the ingress parses the answers


def test_preemption_mode_is_checked_when_the_app_is_built():
    from serve.app import build_app

    with pytest.raises(ValueError, match="scheduling_policy='lifo' is not one of fcfs, priority"):
        build_app({"model": "/models/x", "scheduling_policy": "lifo"})
    with pytest.raises(ValueError, match="preemption_mode='drop' is not one of swap, recompute"):
        build_app({"model": "/models/x", "preemption_mode": "drop"})
    with pytest.raises(ValueError, match="swap_space=-1.0 is not a number of GiB >= 0"):
        build_app({"model": "/models/x", "swap_space": "-1"})
    with pytest.raises(ValueError, match="max_prefill_tokens=0 is not a number of tokens >= 1"):
        build_app({"model": "/models/x", "max_prefill_tokens": "0"})
    app = build_app({"model": "/models/x", "max_prefill_tokens": "2048"})
    assert app._bound_deployment.init_args[0]._bound_deployment.init_kwargs["max_prefill_tokens"] == 2048


def test_gpu_memory_utilization_is_checked_when_the_app_is_built():
    from serve.app import build_app

    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.0 is not in \(0, 1\]"):
        build_app({"model": "/models/x", "gpu_memory_utilization": "0"})
    with pytest.raises(ValueError, match="give kv_cache_tokens or gpu_memory_utilization, not both"):
        build_app({"model": "/models/x", "gpu_memory_utilization": 0.9, "kv_cache_tokens": 65536})


def test_max_block_size_is_the_decoding_block_size_a_memory_sized_replica_probes_at():
    from serve.app import build_app

    def engine_kwargs(app):  # the EngineServer deployment the ingress is bound to
        return app._bound_deployment.init_args[0]._bound_deployment.init_kwargs

    sized = build_app({"model": "/models/x", "gpu_memory_utilization": 0.9, "decoding": {"block_size": 32}})
    assert engine_kwargs(sized)["max_block_size"] == 32
    assert engine_kwargs(build_app({"model": "/models/x"}))["max_block_size"] is None
    with pytest.raises(ValueError, match="decoding block_size 64 is larger than max_block_size 32"):
        build_app({"model": "/models/x", "max_block_size": 32})


def test_dtype_and_chat_template_are_checked_when_the_app_is_built(tmp_path):
    from serve.app import build_app

    def ingress_kwargs(app):
        return app._bound_deployment.init_kwargs

    with pytest.raises(ValueError, match="dtype='fp4' is not one of bfloat16, float16, float32"):
        build_app({"model": "/models/x", "dtype": "fp4"})
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert ingress_kwargs(build_app({"model": "/models/x", "chat_template": template}))["chat_template"] == template
    path = tmp_path / "chat.jinja"
    path.write_text(template)  # a file is read where the app is built: its text travels to the replicas
    assert ingress_kwargs(build_app({"model": "/models/x", "chat_template": str(path)}))["chat_template"] == template
    assert ingress_kwargs(build_app({"model": "/models/x"}))["chat_template"] is None  # the checkpoint's own
    with pytest.raises(ValueError, match="chat_template='/no/such/template.jinja' is neither a file nor a Jinja"):
        build_app({"model": "/models/x", "chat_template": "/no/such/template.jinja"})
    with pytest.raises(ValueError, match="the chat template does not parse: .* \\(line 1\\)"):
        build_app({"model": "/models/x", "chat_template": "{% for m in messages %}{{ m.content }}"})
