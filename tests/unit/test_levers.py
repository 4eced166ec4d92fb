"""The training-speed levers (issue 25) leave the loss and gradients as they were: the chunked loss kernel,
activation checkpointing applied by lm.train, the attention backend; fit_memory's choices of ZeRO stage and
recomputed blocks; the GPU-only levers are refused on CPU (and their GPU tests skip)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm.config import ConfigError, ModelConfig, load_config
from lm.head_loss import linear_cross_entropy
from lm.loss_mask import IGNORE
from lm.model import KVCache, Transformer
from lm.train.ds_config import fit_memory
from lm.train.levers import checkpoint_blocks, prepare_levers, use_attention_backend

REPO = Path(__file__).parents[2]
CUDA = torch.cuda.is_available()
SMALL = ModelConfig(n_layers=3, n_heads=2, d_model=32, max_seq_len=16, vocab_size=96)


def grads(model: Transformer, x: torch.Tensor, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    _, loss = model(x[:, :-1], x[:, 1:], **kwargs)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def twins() -> tuple[Transformer, Transformer, torch.Tensor]:
    torch.manual_seed(0)
    a, b = Transformer(SMALL), Transformer(SMALL)
    b.load_state_dict(a.state_dict())
    return a, b, torch.randint(0, 96, (3, 16))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_the_chunked_loss_gives_cross_entropys_loss_and_gradients(dtype, tol):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(70, 16) * 0.2).to(dtype).requires_grad_()
    targets = torch.randint(0, 70, (50,))
    targets[::4] = IGNORE  # SFT's masked positions are left out of the mean
    plain = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE)
    expected = torch.autograd.grad(plain, (hidden, weight))
    chunked = linear_cross_entropy(hidden, weight, targets, "chunked", chunk=16)  # 4 chunks, the last short
    got = torch.autograd.grad(chunked * 3, (hidden, weight))  # backward scales by the upstream gradient
    assert abs(chunked.item() - plain.item()) < 1e-5
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and (g / 3 - e).abs().max() <= tol * e.abs().max()


def test_the_model_with_the_chunked_kernel_trains_as_with_full_logits():
    a, b, x = twins()
    loss_a, grads_a = grads(a, x)
    loss_b, grads_b = grads(b, x, loss_kernel="chunked")
    assert abs(loss_a - loss_b) < 1e-5
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6), name  # the tied embedding / head too
    assert b(x[:, :-1], x[:, 1:], loss_kernel="chunked")[0] is None  # no logits were made


@pytest.mark.parametrize("blocks", [1, 3])
def test_checkpointed_blocks_give_the_same_gradients_and_leave_inference_alone(blocks):
    a, b, x = twins()
    checkpoint_blocks(b, blocks)
    runs = [0] * SMALL.n_layers  # calls of each block's attention: a recomputed block's again in backward
    for i, layer in enumerate(b.model.layers):
        layer.self_attn.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    loss_a, grads_a = grads(a, x)
    loss_b, grads_b = grads(b, x)
    assert runs == [2] * blocks + [1] * (SMALL.n_layers - blocks)  # the first ``blocks`` blocks only
    with torch.no_grad():
        b.eval()(x)
    b(x[:, :4], kv_cache=KVCache(SMALL, 3, 16))  # generation, even with gradients on
    assert runs == [4] * blocks + [3] * (SMALL.n_layers - blocks)  # once each: nothing recomputed
    assert loss_a == loss_b
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6), name


def test_the_attention_backend_leaves_the_loss_and_unknown_kernels_raise_instead_of_falling_back():
    a, b, x = twins()
    try:
        use_attention_backend("math")
        loss_math, grads_math = grads(a, x)
        use_attention_backend("flash")  # PyTorch's CPU flash kernel
        loss_flash, grads_flash = grads(b, x)
        use_attention_backend("efficient")  # a GPU kernel: on CPU, SDPA has none left to run
        with pytest.raises(RuntimeError):
            grads(b, x)
    finally:
        for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                       torch.backends.cuda.enable_math_sdp, torch.backends.cuda.enable_cudnn_sdp):
            enable(True)
    assert abs(loss_math - loss_flash) < 1e-5
    for name, g in grads_math.items():
        assert torch.allclose(g, grads_flash[name], atol=1e-5), name


def test_fit_memory_picks_the_cheapest_plan_that_fits():
    gpt2 = load_config(REPO / "configs/gpt2-124m.yaml", ["train.zero_stage=auto", "train.gpu_memory_gb=null"])
    _, plan = fit_memory(gpt2, world=1, memory_gb=80)
    assert (plan.zero_stage, plan.recomputed) == (1, 0)  # one worker, half precision: ZeRO-1 (see ds_config)
    fp32 = gpt2.model_copy(update={"train": gpt2.train.model_copy(update={"precision": "fp32"})})
    assert fit_memory(fp32, world=1, memory_gb=80)[1].zero_stage == 0
    assert fit_memory(gpt2, world=8, memory_gb=80)[1].zero_stage == 1
    auto = load_config(REPO / "configs/gpt2-124m.yaml", ["train.zero_stage=auto", "train.gpu_memory_gb=null",
                                                          "train.activation_checkpointing=auto"])
    plans = [fit_memory(auto, world=8, memory_gb=gb)[1] for gb in (80, 20, 12)]
    assert plans[0].recomputed == 0 < plans[1].recomputed < plans[2].recomputed
    assert all(p.estimate.total <= 0.9 * gb * 2**30 for p, gb in zip(plans, (80, 20, 12), strict=True))
    chosen, plan = fit_memory(auto, world=8, memory_gb=12)
    assert chosen.train.activation_checkpointing == plan.recomputed and chosen.train.zero_stage == plan.zero_stage
    with pytest.raises(ValueError, match=r"fits a step in 2 GiB per device \(at best [\d.]+ GiB"):
        fit_memory(auto, world=8, memory_gb=2)
    stated = load_config(REPO / "configs/gpt2-124m.yaml")  # explicit settings are kept, fitting or not
    assert fit_memory(stated, world=8, memory_gb=1)[0].train.zero_stage == 1


def test_lever_settings_are_checked_at_load_and_gpu_only_levers_refused_on_cpu():
    tiny = REPO / "configs/tiny.yaml"
    with pytest.raises(ConfigError, match="explicit zero_stage"):
        load_config(tiny, ["train.zero_stage=auto", "train.offload_optimizer=true"])
    assert load_config(tiny, ["train.activation_checkpointing=2"]).train.activation_checkpointing == 2
    with pytest.raises(ConfigError, match="loss_kernel"):
        load_config(tiny, ["train.loss_kernel=fused"])
    cpu = torch.device("cpu")
    for override, message in [("train.loss_kernel=liger", "GPU only"), ("train.attention_backend=cudnn", "GPU kernel")]:
        with pytest.raises(ValueError, match=message):
            prepare_levers(load_config(tiny, [override]), 1, cpu)


@pytest.mark.skipif(not CUDA, reason="liger-kernel's fused loss is a Triton (GPU) kernel")
def test_the_liger_kernel_gives_cross_entropys_loss():  # pragma: no cover - GPU machines
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(100, 32, device="cuda", dtype=torch.bfloat16) * 0.2
    targets = torch.randint(0, 100, (64,), device="cuda")
    plain = F.cross_entropy((hidden @ weight.T).float(), targets)
    assert abs(linear_cross_entropy(hidden, weight, targets, "liger").item() - plain.item()) < 1e-2
