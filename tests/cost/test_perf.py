"""Performance code: the FLOP counter against a hand count, the response-only LM head against
full logits, and the `flexmoe bench` command."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from flexmoe.cost.flops import counted_flops

from helpers.paths import REPO_ROOT
from helpers.tiny import tiny_model


def qwen2_moe_forward_flops_by_hand(tokens: int, seq_len: int) -> int:
    """helpers.tiny's tiny qwen2_moe: hidden 32, 4 heads of 8, 2 kv heads, 2 layers, 8 experts (top 2,
    intermediate 16), shared expert 24 with a scalar gate, vocab 96, untied head."""
    hidden, kv, layers, vocab = 32, 16, 2, 96
    attention_projections = 2 * hidden * hidden * 2 + 2 * hidden * kv * 2  # q, o and k, v
    scores_and_values = 2 * 2 * seq_len * hidden  # QK^T and AV over every key position
    router = 2 * hidden * 8
    routed = 2 * 2 * 3 * hidden * 16  # top-2 experts, gate/up/down
    shared = 2 * 3 * hidden * 24 + 2 * hidden
    per_token = layers * (attention_projections + scores_and_values + router + routed + shared) + 2 * hidden * vocab
    return tokens * per_token


def test_counted_forward_flops_match_a_hand_count():
    model = tiny_model("qwen2_moe").eval()
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flops = counted_flops(lambda: model(input_ids=input_ids))
    assert flops == qwen2_moe_forward_flops_by_hand(tokens=24, seq_len=12)


def test_grouped_expert_flops_equal_the_per_expert_loop_forward_and_backward():
    """transformers' grouped_mm experts (our formula) and its eager loop (torch's mm formula)
    do the same routed work, in the forward and in the backward."""
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    def step(model):
        return lambda: model(input_ids=input_ids, labels=input_ids).loss.backward()

    grouped = counted_flops(step(tiny_model("qwen2_moe", experts_implementation="grouped_mm")))
    eager = counted_flops(step(tiny_model("qwen2_moe", experts_implementation="eager")))
    forward = qwen2_moe_forward_flops_by_hand(tokens=24, seq_len=12)
    recomputed_scores = 2 * 24 * 2 * 12 * 32  # layers x tokens x QK^T: flash attention's backward recomputes it
    assert grouped == eager == 3 * forward + recomputed_scores  # full training: forward + 2x in the backward


@pytest.mark.parametrize("family", ["qwen2_moe", "granitemoe"])  # granitemoe scales its logits after the head
def test_response_only_head_gives_transformers_loss_and_gradient(family):
    from flexmoe.models import add_lora
    from flexmoe.train import response_loss

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 96, (3, 10), generator=generator)
    labels = input_ids.clone()
    labels[:, :6] = -100  # a prompt of 6 tokens
    labels[2, 8:] = -100  # and padding on the last row
    attention_mask = (labels != -100).long()
    attention_mask[:, :6] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    ours, reference = (add_lora(tiny_model(family), scope="attention", r=2, seed=0) for _ in range(2))
    loss_sum, tokens = response_loss(ours, batch)
    (loss_sum / tokens).backward()
    expected = reference(**batch).loss  # transformers' causal-LM loss over every position
    expected.backward()
    torch.testing.assert_close(loss_sum / tokens, expected, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)


def bench_args(*argv: str):
    import argparse

    from flexmoe.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench, parser.parse_args(list(argv))


def test_bench_refuses_a_directory_without_benchmarks(tmp_path):
    from flexmoe.errors import FlexmoeError

    bench, args = bench_args("--root", str(tmp_path))
    with pytest.raises(FlexmoeError, match=f"no benchmarks/ in {tmp_path}"):
        bench.run(args)


def fake_checkout(root):
    """A checkout whose benchmarks/ is the real runner plus one quick benchmark."""
    real = REPO_ROOT / "benchmarks"
    (root / "benchmarks").mkdir()
    for name in ("__init__.py", "__main__.py"):
        shutil.copy(real / name, root / "benchmarks" / name)
    (root / "benchmarks" / "bench_quick.py").write_text(
        "def main(results_dir):\n    (results_dir / 'quick.md').write_text('measured')\n")
    return root


def test_bench_runs_the_named_benchmark_of_the_checkout(tmp_path):
    from flexmoe.errors import FlexmoeError

    root = fake_checkout(tmp_path)
    bench, args = bench_args("quick", "--root", str(root))
    assert bench.run(args) == 0
    assert (root / "benchmarks" / "results" / "quick.md").read_text() == "measured"
    with pytest.raises(FlexmoeError, match="unknown benchmark 'slow'; available: quick"):
        bench.run(bench_args("slow", "--root", str(root))[1])


def test_bench_module_imports_no_torch():
    code = "import sys, flexmoe.commands.bench; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_bf16_training_keeps_attention_in_fp32_and_restores_the_implementation():
    from flexmoe.config import load_config
    from flexmoe.data import collate
    from flexmoe.models import add_lora
    from flexmoe.train import local_train

    model = add_lora(tiny_model("qwen2_moe"), scope="attention", r=2, seed=0)
    seen = []
    o_proj = model.get_base_model().model.layers[0].self_attn.o_proj
    o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = torch.randint(3, 96, (4, 10), generator=torch.Generator().manual_seed(0)).tolist()
    features = [{"input_ids": row, "labels": [-100] * 5 + row[5:]} for row in ids]
    config = load_config(None, ['train.precision="bf16"', "train.local_steps=2", "train.batch_size=2"]).train
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    local_train(model, params, features, lambda f: collate(f, 0), config, lr=1e-3, seed=0)
    assert seen == [torch.float32, torch.float32]  # the attention output entering o_proj, once per step
    assert model.get_base_model().config._attn_implementation == "sdpa"
