"""Hub round trips over real HTTP on 127.0.0.1: push with adq_hf / transformers, download into
fresh caches with timm, transformers (TimmWrapper and AutoModel) and ``adq_hf.download``.

The server is tests/hub_server.py (why a test-only server: see its docstring); the client side is
the real huggingface_hub, timm and transformers code, pointed at it by tests/conftest.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

import adq_hf
from adq_hf import ADQConfig
from adq_hf.data import minilm_path
from adq_hf.serialization import CheckpointError

from conftest import LOCAL_HUB_PORT
from hub_server import LocalHub

TOKEN = "hf_local_test_token"


@pytest.fixture(scope="module")
def hub():
    previous = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = TOKEN  # the token comes from the environment, as for users
    with LocalHub(TOKEN, port=LOCAL_HUB_PORT) as server:
        yield server
    if previous is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = previous


def _quantized_timm(bits=2, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10, quantization_config=ADQConfig(weight_bits=bits, activation_bits=4))
    model.train()
    model(torch.randn(8, 3, 64, 64))  # first batch initialises the activation quantizers
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pushed_timm(hub, images):
    model = _quantized_timm()
    results = {"fp_top1": 0.9, "fp_top5": 0.99, "top1": 0.8, "top5": 0.97, "epoch_time_s": [12.0]}
    recipe = yaml.safe_dump({"data": {"source": "fashion_mnist", "eval_split": "test"}})
    info = adq_hf.push_to_hub(model, "adq-test/test-resnet-w2a4", results=results, recipe_config=recipe,
                              command="python recipes/qat_imagenet.py --config x.yaml", dataset="fashion_mnist")
    with torch.no_grad():
        expected = model(images)
    return {"model": model, "commit": info.oid, "expected": expected, "repo": "adq-test/test-resnet-w2a4"}


@torch.no_grad()
def test_timm_push_then_create_model_from_the_hub_gives_identical_outputs(pushed_timm, images, tmp_path):
    files = set(HfApi().list_repo_files(pushed_timm["repo"]))
    assert {"config.json", "model.safetensors", "README.md", "bit_report.md", "bit_report.json", "bit_report.png"} <= files
    loaded = timm.create_model(f"hf-hub:{pushed_timm['repo']}", pretrained=True, cache_dir=str(tmp_path)).eval()
    assert torch.equal(loaded(images), pushed_timm["expected"])
    assert adq_hf.bit_map(loaded) == adq_hf.bit_map(pushed_timm["model"])
    assert any(tmp_path.rglob("model.safetensors"))  # it came through the fresh cache


@torch.no_grad()
def test_transformers_loads_the_timm_checkpoint_through_timm_wrapper(pushed_timm, images, tmp_path):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(pushed_timm["repo"], cache_dir=str(tmp_path)).eval()
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    assert torch.equal(model(pixel_values=images).logits, pushed_timm["expected"])


def test_model_card_is_rendered_from_measured_results(pushed_timm, tmp_path):
    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download(pushed_timm["repo"], "README.md", cache_dir=str(tmp_path)))
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and {"quantization", "adq"} <= set(data["tags"])
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == 0.8 and metrics[0]["type"] == "accuracy"
    assert 'timm.create_model("hf-hub:adq-test/test-resnet-w2a4"' in card.text
    assert "| this model | 80.00% | 97.00% |" in card.text and "python recipes/qat_imagenet.py" in card.text
    assert "Average weight bits" in card.text and "bit_report.png" in card.text


def test_card_without_results_claims_no_accuracy(tmp_path):
    from adq_hf.model_card import render_model_card

    adq_hf.save_pretrained(_quantized_timm(), str(tmp_path))
    text = render_model_card(str(tmp_path))
    assert "model-index" not in text and "Results (measured)" not in text and "top-1" not in text
    assert "average weight bits" in text


@torch.no_grad()
def test_revision_pins_a_commit_and_branches_are_created(hub, pushed_timm, images, tmp_path):
    repo = pushed_timm["repo"]
    newer = _quantized_timm(bits=4, seed=3)
    second = adq_hf.push_to_hub(newer, repo, commit_message="W4 version")
    assert second.oid != pushed_timm["commit"]
    latest = timm.create_model(f"hf-hub:{repo}", cache_dir=str(tmp_path / "a")).eval()
    assert latest.layer1[0].conv1.weight_bits == 4 and torch.equal(latest(images), newer(images))
    pinned = timm.create_model(f"hf-hub:{repo}@{pushed_timm['commit']}", cache_dir=str(tmp_path / "b")).eval()
    assert torch.equal(pinned(images), pushed_timm["expected"])
    folder = adq_hf.hub.download(repo, revision=pushed_timm["commit"], cache_dir=str(tmp_path / "c"))
    assert json.load(open(os.path.join(folder, "config.json")))["quantization_config"]["weight_bits"] == 2

    branch = adq_hf.push_to_hub(_quantized_timm(bits=3), repo, revision="w3")
    refs = HfApi().list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "w3"}
    assert HfApi().model_info(repo, revision="w3").sha == branch.oid
    on_branch = timm.create_model(f"hf-hub:{repo}@w3", cache_dir=str(tmp_path / "d"))
    assert on_branch.layer1[0].conv1.weight_bits == 3


def test_private_repo_needs_the_token_and_create_pr_leaves_main_alone(hub, tmp_path):
    repo = "adq-test/private-w2"
    adq_hf.push_to_hub(_quantized_timm(), repo, private=True)
    assert HfApi().model_info(repo).private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(repo)
    main_before = HfApi().model_info(repo).sha
    pr = adq_hf.push_to_hub(_quantized_timm(bits=4), repo, create_pr=True, commit_message="try W4")
    assert pr.pr_url and pr.pr_url.endswith("/discussions/1")
    assert HfApi().model_info(repo).sha == main_before
    proposed = timm.create_model(f"hf-hub:{repo}@refs/pr/1", cache_dir=str(tmp_path))
    assert proposed.layer1[0].conv1.weight_bits == 4
    with pytest.raises(ValueError, match="create_pr=True opens a pull request against main"):
        adq_hf.push_to_hub(_quantized_timm(), repo, create_pr=True, revision="other")


@pytest.fixture(scope="module")
def minilm_w4():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path(), quantization_config=ADQConfig(weight_bits=4, activation_bits=None))
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    return model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def test_transformers_push_to_hub_and_from_pretrained_round_trip(hub, minilm_w4, tmp_path):
    from transformers import AutoModel

    model, inputs = minilm_w4
    model.push_to_hub("adq-test/minilm-w4")  # transformers' own upload path, through our HfQuantizer
    loaded = AutoModel.from_pretrained("adq-test/minilm-w4", cache_dir=str(tmp_path)).eval()
    assert isinstance(loaded.config.quantization_config, ADQConfig)
    assert torch.equal(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_adq_push_of_a_transformers_model_adds_card_and_report(hub, minilm_w4, tmp_path):
    from transformers import AutoModel

    model, inputs = minilm_w4
    adq_hf.push_to_hub(model, "adq-test/minilm-w4-card")
    files = set(HfApi().list_repo_files("adq-test/minilm-w4-card"))
    assert {"config.json", "model.safetensors", "README.md", "bit_report.md"} <= files
    card = open(adq_hf.hub.download("adq-test/minilm-w4-card", cache_dir=str(tmp_path)) + "/README.md").read()
    assert "library_name: transformers" in card and 'AutoModel.from_pretrained("adq-test/minilm-w4-card")' in card
    loaded = AutoModel.from_pretrained("adq-test/minilm-w4-card", cache_dir=str(tmp_path / "m")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_damaged_incomplete_and_foreign_repos_fail_clearly(hub, pushed_timm, tmp_path):
    api = HfApi()
    good = adq_hf.hub.download(pushed_timm["repo"], revision=pushed_timm["commit"], cache_dir=str(tmp_path / "g"))
    weights = open(os.path.join(good, "model.safetensors"), "rb").read()
    config = json.load(open(os.path.join(good, "config.json")))

    api.create_repo("adq-test/damaged")
    api.upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id="adq-test/damaged")
    with pytest.raises(CheckpointError, match="has no model.safetensors: the upload is incomplete"):
        timm.create_model("hf-hub:adq-test/damaged", cache_dir=str(tmp_path / "1"))
    hub.corrupt("adq-test/damaged", "model.safetensors", weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        timm.create_model("hf-hub:adq-test/damaged", cache_dir=str(tmp_path / "2"))

    foreign = dict(config, quantization_config={"quant_method": "gptq", "bits": 4})
    api.create_repo("adq-test/foreign")
    api.upload_file(path_or_fileobj=json.dumps(foreign).encode(), path_in_repo="config.json", repo_id="adq-test/foreign")
    api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id="adq-test/foreign")
    with pytest.raises(CheckpointError, match="quant_method='gptq', which adq_hf does not read"):
        timm.create_model("hf-hub:adq-test/foreign", cache_dir=str(tmp_path / "3"))
    with pytest.raises(CheckpointError, match="not an adq_hf checkpoint"):
        adq_hf.hub.download("adq-test/foreign", cache_dir=str(tmp_path / "4"))
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        adq_hf.hub.push_folder(str(tmp_path / "only_config"), "adq-test/never-created")
    assert not api.repo_exists("adq-test/never-created")  # checked before anything was created


def test_command_line_push_and_download(hub, tmp_path, capsys):
    from adq_hf.cli import main

    adq_hf.save_pretrained(_quantized_timm(), str(tmp_path / "saved"))
    assert main(["push", str(tmp_path / "saved"), "adq-test/cli-w2", "--commit-message", "from the CLI"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert "README.md" in HfApi().list_repo_files("adq-test/cli-w2")  # a card was rendered for it
    assert main(["download", "adq-test/cli-w2", "--local-dir", str(tmp_path / "down")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "down")
    assert main(["download", "adq-test/does-not-exist", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "error:" in capsys.readouterr().err


def test_without_adq_hf_plain_loaders_refuse_instead_of_loading_floats(pushed_timm, minilm_w4, hub):
    """A user who forgets ``import adq_hf`` must get an error, not a float model with random weights."""
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModel, AutoModelForImageClassification
        import timm
        assert "adq_hf" not in sys.modules
        for name, load in [("timm", lambda: timm.create_model("hf-hub:{pushed_timm['repo']}@{pushed_timm['commit']}", pretrained=True)),
                           ("timm_wrapper", lambda: AutoModelForImageClassification.from_pretrained("{pushed_timm['repo']}")),
                           ("auto_model", lambda: AutoModel.from_pretrained("adq-test/minilm-w4"))]:
            try:
                load()
                print(name, "LOADED")
            except Exception as err:
                print(name, "REFUSED", type(err).__name__, "size mismatch" in str(err) or "MISMATCH" in str(err)
                      or "ignore_mismatched_sizes" in str(err))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines == {"timm": "REFUSED RuntimeError True", "timm_wrapper": "REFUSED RuntimeError True",
                     "auto_model": "REFUSED RuntimeError True"}, proc.stdout
