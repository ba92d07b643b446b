"""Block-by-block PTQ (adq_hf.blockwise + ptq.quantize): one pass through the model from cached block
inputs, the same result as quantizing layer at a time, on a real timm ResNet-20 with real
Fashion-MNIST images, a transformers Llama (rotary, grouped KV heads, padding) and the real MiniLM;
fallbacks, calibration from text and datasets, interruption and resuming."""

import copy

import pytest
import timm
import torch
from torch import nn

import adq_hf
from adq_hf import ADQConfig
from adq_hf.blockwise import capture_inputs, find_blocks, plan_blocks
from adq_hf.calibration import calibration_batches
from adq_hf.ptq import PTQInterrupted, _input_groups, quantize
from conftest import fashion_mnist_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fmnist_batches():
    return fashion_mnist_batches(64, batch_size=32)


def _weights(model):
    return {n: m.latent_weight().detach().clone() for n, m in adq_hf.quantized_layers(model)}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()


@pytest.mark.slow
def test_resnet20_block_by_block_equals_layer_at_a_time_in_one_pass(fmnist_batches, method="sa"):
    config = ADQConfig(weight_bits=3, activation_bits=None, granularity="per_channel", codebook_init_iters=5)
    by_layer, model = _resnet(), _resnet()
    layer_path_stem_calls, stem_calls = [], []
    by_layer.conv1.register_forward_hook(lambda *a: layer_path_stem_calls.append(1))
    model.conv1.register_forward_hook(lambda *a: stem_calls.append(1))
    quantize(by_layer, fmnist_batches, ADQConfig.from_dict(config.to_dict()), method=method, progress=False,
             blockwise=False)
    quantize(model, fmnist_batches, config, method=method, progress=False)
    assert model.ptq_plan == {"blockwise": True, "blocks": 9, "reason": "", "shared_arguments": True}
    assert by_layer.ptq_plan["blockwise"] is False
    _assert_same_weights(model, by_layer)
    assert model.ptq_report.keys() == by_layer.ptq_report.keys()
    # one pass: besides single-batch checks (three; two without blocks; activation calibration runs nothing
    # without input quantizers), the stem runs once per batch to capture the first block's inputs, once for
    # the classifier after the blocks and once for BatchNorm re-estimation; layer at a time it runs once
    # per layer and batch
    assert len(stem_calls) == 3 + 3 * len(fmnist_batches)
    assert len(layer_path_stem_calls) == 2 + (21 + 1) * len(fmnist_batches)


def _llama(layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _token_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 96, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0  # padding: left out of every Hessian
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.mark.parametrize("method", ["rtn", "gptq", "sa"])
def test_llama_blocks_with_rotary_and_padding_equal_layer_at_a_time(method):
    config = ADQConfig(weight_bits=3, granularity="per_channel", codebook_init_iters=3)
    batches = _token_batches()
    with pytest.warns(UserWarning, match="lm_head"):  # tied to the embeddings: stays float
        by_layer = quantize(_llama(), batches, ADQConfig.from_dict(config.to_dict()), method=method, progress=False,
                            blockwise=False)
    model = _llama()
    with pytest.warns(UserWarning, match="lm_head"):
        quantize(model, batches, config, method=method, progress=False)
    assert model.ptq_plan["blockwise"] and model.ptq_plan["blocks"] == 3 and model.ptq_plan["shared_arguments"]
    _assert_same_weights(model, by_layer)


def test_layers_fed_the_same_input_form_one_group_in_forward_order():
    model = _llama(layers=2)
    adq_hf.quantize_model(model, ADQConfig(weight_bits=4, codebook_init_iters=1))
    batch = _token_batches(1)[0]
    layers = [(n, m) for n, m in adq_hf.quantized_layers(model)]
    plan = plan_blocks(model, [m for _, m in layers], batch)
    inputs = capture_inputs(model, plan, [batch])
    block = plan.blocks[0][1]
    inside = [(n, m) for n, m in layers if any(m is x for x in block.modules())]
    groups = [[n.split(".")[-1] for n, _ in g] for g in _input_groups(plan, 0, inside, inputs[0])]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


class _FreedInput(nn.Module):
    """``b`` is fed a new tensor made right after ``a``'s input is freed: it takes that tensor's Python
    object slot, so the two inputs have the same ``id`` although they are different tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, h):
        return self.b(h + self.a(torch.tanh(h)))


class _FreedInputChain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_FreedInput() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_layer_fed_a_new_tensor_in_a_freed_ones_place_is_not_grouped_with_the_layer_before():
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = ADQConfig(weight_bits=2, first_layer_bits=None, last_layer_bits=None, codebook_init_iters=2)
    ids = []
    probe = _FreedInputChain().eval()
    for block in probe.blocks:
        for layer in (block.a, block.b):
            layer.register_forward_pre_hook(lambda m, a: ids.append(id(a[0])))
    with torch.no_grad():
        probe(batches[0])
    assert ids[0] == ids[1]  # the situation under test: b's input reuses a's freed input's id
    reference = quantize(_FreedInputChain(), batches, ADQConfig.from_dict(config.to_dict()), method="gptq",
                         progress=False, blockwise=False)
    model = quantize(_FreedInputChain(), batches, config, method="gptq", progress=False)
    assert model.ptq_plan["blockwise"] and model.ptq_plan["blocks"] == 3
    # b's Hessian is taken after a is PTQ'd (as layer at a time), not in one pass with a
    _assert_same_weights(model, reference)
    layers = adq_hf.quantized_layers(model)
    plan = plan_blocks(model, [m for _, m in layers], batches[0])
    inputs = capture_inputs(model, plan, batches[:1])
    for index, (_, block) in enumerate(plan.blocks):
        inside = [(n, m) for n, m in layers if any(m is x for x in block.modules())]
        assert [[n.split(".")[-1] for n, _ in g] for g in _input_groups(plan, index, inside, inputs[0])] == [["a"], ["b"]]


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, scale=1.0):
        return torch.relu(self.fc(x)) * scale


class _PerBlockArguments(nn.Module):
    """Blocks called with an argument that differs per block: every block's call is captured."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.blocks, self.head = nn.Linear(4, 6), nn.ModuleList(_Scaled() for _ in range(3)), nn.Linear(6, 3)

    def forward(self, x):
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, scale=1.0 + i)
        return self.head(h)


class _Parallel(_PerBlockArguments):
    """Blocks that are not a chain (each reads the stem output): no block plan, layer at a time."""

    def forward(self, x):
        h = self.stem(x)
        return self.head(sum(block(h) for block in self.blocks))


@pytest.mark.parametrize("cls, blockwise, shared", [(_PerBlockArguments, True, False), (_Parallel, False, None)])
def test_per_block_arguments_and_unchained_blocks(cls, blockwise, shared):
    batches = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = ADQConfig(weight_bits=2, first_layer_bits=None, last_layer_bits=None, codebook_init_iters=2)
    reference = quantize(cls(), batches, ADQConfig.from_dict(config.to_dict()), method="gptq", progress=False,
                         blockwise=False)
    model = quantize(cls(), batches, config, method="gptq", progress=False)
    assert model.ptq_plan["blockwise"] is blockwise and model.ptq_plan["shared_arguments"] is shared
    if not blockwise:
        assert model.ptq_plan["reason"] == "a block's input is not the previous block's output"
    _assert_same_weights(model, reference)


def test_find_blocks_picks_transformer_layers_and_residual_blocks():
    resnet = adq_hf.quantize_model(_resnet(), ADQConfig(weight_bits=4, codebook_init_iters=1))
    names = [n for n, _ in find_blocks(resnet, [m for _, m in adq_hf.quantized_layers(resnet)])]
    assert names == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    llama = _llama()
    adq_hf.quantize_model(llama, ADQConfig(weight_bits=4, codebook_init_iters=1))
    assert [n for n, _ in find_blocks(llama, [m for _, m in adq_hf.quantized_layers(llama)])] == \
        ["model.layers.0", "model.layers.1", "model.layers.2"]


@pytest.mark.slow
def test_minilm_from_text_and_a_dataset_block_by_block():
    """Real MiniLM weights, calibration from a list of strings with its tokenizer, the same from a
    datasets.Dataset; block by block equals layer at a time."""
    import datasets
    from transformers import AutoModel, AutoTokenizer

    from adq_hf.data import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = ["The cat sat quietly on the warm windowsill.", "Quantization reduces the memory a model needs.",
                 "Rain is expected in the northern valleys tomorrow.", "She paid for the groceries with cash.",
                 "Short one.", "The committee postponed its decision until March, citing the weather."]
    # two of the six layers quantized (test time); the float blocks still run in the chain
    config = ADQConfig(weight_bits=3, granularity="per_channel", codebook_init_iters=3,
                       modules_to_not_convert=[r"encoder\.layer\.[2-5]\..*", "pooler"])

    def load():
        return AutoModel.from_pretrained(path, quantization_config=ADQConfig.from_dict(config.to_dict())).eval()

    by_layer = quantize(load(), sentences, method="gptq", tokenizer=tokenizer, progress=False, blockwise=False)
    model = quantize(load(), sentences, method="gptq", tokenizer=tokenizer, progress=False)
    assert len(model.ptq_report) == 12
    assert model.ptq_plan["blockwise"] and model.ptq_plan["blocks"] == 6
    _assert_same_weights(model, by_layer)
    from_dataset = calibration_batches(datasets.Dataset.from_dict({"text": sentences}), tokenizer)
    assert [b["input_ids"].tolist() for b in from_dataset] == \
        [b["input_ids"].tolist() for b in calibration_batches(sentences, tokenizer)]
    tokens = datasets.Dataset.from_dict({"input_ids": [tokenizer(s)["input_ids"] for s in sentences[:3]]})
    padded = calibration_batches(tokens, tokenizer, batch_size=3)[0]
    assert padded["attention_mask"].sum(1).tolist() == [len(tokenizer(s)["input_ids"]) for s in sentences[:3]]
    with pytest.raises(ValueError, match="calibration data is text: pass the model's tokenizer"):
        quantize(model, sentences, progress=False)


def test_interrupted_run_says_how_far_it_got_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    from adq_hf import blockwise

    batches = _token_batches()
    config = ADQConfig(weight_bits=3, granularity="per_channel", codebook_init_iters=3)
    with pytest.warns(UserWarning):
        finished = quantize(_llama(), batches, ADQConfig.from_dict(config.to_dict()), method="sa", progress=False)
    original = blockwise.BlockInput.advance

    def interrupt_in_block_two(self, plan, index):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, plan, index)

    monkeypatch.setattr(blockwise.BlockInput, "advance", interrupt_in_block_two)
    model = _llama()
    with pytest.warns(UserWarning), pytest.raises(PTQInterrupted, match=r"interrupted in block 2 \(model.layers.1\): "
                                                                      r"1 of 3 blocks are PTQ'd.*resume_dir="):
        quantize(model, batches, ADQConfig.from_dict(config.to_dict()), method="sa", progress=False,
                 resume_dir=str(tmp_path))
    assert (tmp_path / "ptq_progress.safetensors").is_file()
    monkeypatch.setattr(blockwise.BlockInput, "advance", original)
    resumed = _llama()
    with pytest.warns(UserWarning):
        quantize(resumed, batches, ADQConfig.from_dict(config.to_dict()), method="sa", progress=False,
                 resume_dir=str(tmp_path))
    _assert_same_weights(resumed, finished)
    assert set(resumed.ptq_report) == {n for n, _ in adq_hf.quantized_layers(resumed)
                                       if not n.startswith("model.layers.0.")}  # block 1 came from the file
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="belongs to another PTQ run"):
        quantize(_llama(), batches, ADQConfig.from_dict(config.to_dict()), method="gptq", progress=False,
                 resume_dir=str(tmp_path))
    without = copy.deepcopy(_llama())
    monkeypatch.setattr(blockwise.BlockInput, "advance", interrupt_in_block_two)
    with pytest.warns(UserWarning), pytest.raises(PTQInterrupted, match="pass resume_dir= to be able to continue"):
        quantize(without, batches, ADQConfig.from_dict(config.to_dict()), method="sa", progress=False)
