"""Using a finished run: `flexmoe generate`, `flexmoe export` + `flexmoe.load_personalized`,
`flexmoe eval`, on a 2-round run of a tiny random qwen2_moe over a small Dolly-style file."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from flexmoe.errors import FlexmoeError

from helpers.usage import PROMPT, command, logits, save_model, train


def test_restored_clients_carry_their_own_graft_and_the_global_lora(flex_run):
    from flexmoe.engine.restore import restore
    from flexmoe.models import current_selection, load_base, graft_state, read_graft, shared_state

    first, second = restore(flex_run, 0), restore(flex_run, 1)
    for restored, cid in ((first, 0), (second, 1)):
        stored, metadata = read_graft(flex_run / "clients" / str(cid) / "personal.safetensors")
        assert current_selection(restored.model) == json.loads(metadata["selection"])
        state = graft_state(restored.model)
        assert set(state) == set(stored) and all(torch.equal(state[k], stored[k]) for k in stored)
    shared, global_weights = shared_state(first.model, first.checkpoint.method.roles), first.checkpoint.global_weights
    assert shared and set(shared) == set(global_weights)
    assert all("lora_" in n and torch.equal(shared[n], global_weights[n]) for n in shared)
    base, tokenizer = load_base(first.checkpoint.config.model)
    assert not torch.allclose(logits(first.model, tokenizer), logits(second.model, tokenizer))
    assert not torch.allclose(logits(first.model, tokenizer), logits(base, tokenizer))


def test_generate_streams_the_clients_own_answer(flex_run, capsys):
    from flexmoe.data import Example
    from flexmoe.engine.restore import restore
    from flexmoe.eval.rouge import generate_responses

    answers = {}
    for cid in range(4):
        assert command("generate", ["--run", str(flex_run), "--client", str(cid), "--prompt", PROMPT,
                                    "--max-new-tokens", "8"]) == 0
        answers[cid] = capsys.readouterr().out.strip()
        restored = restore(flex_run, cid)
        expected = generate_responses(restored.model, restored.tokenizer, [Example(PROMPT, "")],
                                      max_new_tokens=8)[0]
        assert answers[cid] == expected  # the streamed text is the model's greedy answer
    assert len(set(answers.values())) > 1, answers  # grafts differ, so do the answers


def test_generate_reads_prompt_files_and_the_global_model(flex_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\ndescribe the word saw\n")
    assert command("generate", ["--run", str(flex_run), "--global", "--file", str(prompts),
                                "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("### ") == 2 and f"### {PROMPT}" in out and "### describe the word saw" in out


@pytest.mark.parametrize("argv, message", [
    (["--client", "7", "--prompt", "x"], "no client 7"),
    (["--client", "-1", "--prompt", "x"], "no client -1"),
    (["--client", "0", "--prompt", "  "], "--prompt is empty"),
    (["--client", "0", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_generate_refuses_bad_requests(flex_run, argv, message):
    with pytest.raises(FlexmoeError, match=message):
        command("generate", ["--run", str(flex_run), *argv])


def test_generate_refuses_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(FlexmoeError, match="not a flexmoe run directory"):
        command("generate", ["--run", str(tmp_path), "--client", "0", "--prompt", "x"])


def test_generate_refuses_a_changed_base_model(flex_run, model_dir, workdir, tmp_path):
    other = save_model(workdir / "other-base", seed=1)
    run_copy = tmp_path / "run"
    shutil.copytree(flex_run, run_copy)
    config = run_copy / "config.toml"
    text = config.read_text()
    assert model_dir in text  # the run names the base it was trained on
    config.write_text(text.replace(model_dir, other))
    with pytest.raises(FlexmoeError, match="different base model|trained on base model"):
        command("generate", ["--run", str(run_copy), "--client", "0", "--prompt", PROMPT])


def plain_load(export_dir: Path, dtype=torch.float32):
    """An export loaded the way someone without flexmoe loads it, for its layout."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    layout = json.loads((export_dir / "flexmoe-export.json").read_text())["layout"]
    if layout == "grafted":
        return AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=dtype).eval()
    if layout == "merged":
        return AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).eval()
    base = AutoModelForCausalLM.from_pretrained(export_dir / "base-without-adapter", dtype=dtype)
    return PeftModel.from_pretrained(base, export_dir).eval()


def test_a_flex_export_is_a_transformers_model_that_carries_its_graft(flex_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import flexmoe
    from flexmoe.engine.restore import restore
    from flexmoe.models import grafts_disabled

    out = tmp_path / "client2"
    assert command("export", ["--run", str(flex_run), "--client", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code=True" in printed and "load_personalized" in printed
    manifest = json.loads((out / "flexmoe-export.json").read_text())
    assert (manifest["client"], manifest["method"], manifest["round"]) == (2, "flex", 2)
    assert manifest["layout"] == "grafted" and manifest["merged"]
    assert (out / "modeling_flexmoe.py").is_file() and not (out / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary directory was renamed into place
    with pytest.raises(ValueError, match="custom code"):  # a plain load never returns the base without its graft
        AutoModelForCausalLM.from_pretrained(out)

    plain = plain_load(out)
    model, tokenizer = flexmoe.load_personalized(out)
    got = logits(plain, tokenizer)
    assert torch.equal(got, logits(model, tokenizer))
    reference = restore(flex_run, 2)
    torch.testing.assert_close(got, logits(reference.model, reference.tokenizer), rtol=1e-4, atol=1e-5)  # LoRA merged
    with grafts_disabled(reference.model):
        without_graft = logits(reference.model, reference.tokenizer)
    assert (got - without_graft).abs().max() > 1e-2


@pytest.fixture(scope="module")
def fedavg_run(workdir, model_dir, data_file) -> Path:
    return train(model_dir, data_file, workdir / "fedavg-run", "method=fedavg", "rounds=1", "num_clients=2",
                 "clients_per_round=2", "eval.knowledge=false", "eval.base=false")


def test_a_baseline_export_is_a_peft_adapter_or_with_merge_a_plain_checkpoint(fedavg_run, tmp_path):
    from transformers import AutoModelForCausalLM

    import flexmoe
    from flexmoe.engine.export import export_client
    from flexmoe.engine.restore import restore

    adapter = export_client(fedavg_run, 1, tmp_path / "adapter")
    merged = export_client(fedavg_run, 1, tmp_path / "merged", merge=True)
    layouts = [json.loads((d / "flexmoe-export.json").read_text())["layout"] for d in (adapter, merged)]
    assert layouts == ["adapter", "merged"]
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    assert not (merged / "adapter_config.json").exists() and not (merged / "modeling_flexmoe.py").exists()
    reference = restore(fedavg_run, 1)
    expected = logits(reference.model, reference.tokenizer)

    with_peft = logits(plain_load(adapter), reference.tokenizer)
    assert torch.equal(with_peft, expected)  # nothing recomputed: base + LoRA as trained
    assert torch.equal(logits(flexmoe.load_personalized(adapter)[0], reference.tokenizer), with_peft)
    # transformers' own PEFT integration follows adapter_config.json to base-without-adapter
    integrated = AutoModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    assert torch.equal(logits(integrated, reference.tokenizer), expected)

    plain = logits(plain_load(merged), reference.tokenizer)
    assert torch.equal(logits(flexmoe.load_personalized(merged)[0], reference.tokenizer), plain)
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-5)


def test_export_refuses_an_existing_directory_and_a_missing_client(flex_run, tmp_path):
    existing = tmp_path / "taken"
    existing.mkdir()
    with pytest.raises(FlexmoeError, match="already exists"):
        command("export", ["--run", str(flex_run), "--client", "0", "--out", str(existing)])
    with pytest.raises(FlexmoeError, match="no client 9"):
        command("export", ["--run", str(flex_run), "--client", "9", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_load_personalized_refuses_a_directory_that_is_no_export(tmp_path):
    import flexmoe

    with pytest.raises(FlexmoeError, match="not an exported flexmoe model"):
        flexmoe.load_personalized(tmp_path)


def last_evaluation(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in records if r["kind"] == "eval")
    return {r["client"]: r for r in records if r["kind"] == "eval" and r["round"] == last}


def test_eval_of_a_finished_run_equals_its_own_last_evaluation(flex_run, capsys):
    assert command("eval", ["--run", str(flex_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = last_evaluation(flex_run)
    assert result["round"] == 2 and [r["client"] for r in result["clients"]] == [0, 1, 2, 3]
    for record in result["clients"]:
        reference = expected[record["client"]]
        assert record.pop("examples") == 2  # eval.max_test_examples of the run, all there (test splits >= 2)
        assert set(record) == set(reference) - {"rouge_l_global"}  # the global model is not re-evaluated
        assert {"rouge_l", "test_loss", "knowledge_loss", "routing_entropy", "routing_drift"} <= set(record)
        for key, value in record.items():
            if isinstance(value, float) and key != "rouge_l":
                assert value == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
            else:
                assert value == reference[key], key
    summary = json.loads((flex_run / "summary.json").read_text())
    assert result["mean"]["rouge_l_avg"] == pytest.approx(summary["rouge_l_avg"])
    assert result["mean"]["knowledge_loss"] == pytest.approx(summary["knowledge_loss"], rel=1e-6)


def test_eval_on_a_user_file_scores_a_seeded_stratified_sample(flex_run, workdir, capsys):
    from flexmoe.data import load_examples
    from flexmoe.data.sample import stratified_sample
    from flexmoe.engine.restore import restore
    from flexmoe.eval.rouge import personalized_rouge_l

    data = workdir / "dolly.jsonl"
    assert command("eval", ["--run", str(flex_run), "--clients", "3,1", "--data", str(data)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "round 2" in table[0] and "ROUGE-L" in table[2]
    # the run's eval.max_test_examples = 2, not the file's first two rows (both of one category)
    assert table[0].endswith("on 2 of 40 examples (seeded sample, stratified by category)")
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[4:])}
    assert set(rows) == {"1", "3", "mean"} and rows["3"][1] == "2"
    sample = stratified_sample(load_examples(data), 2, seed=5)  # the run's seed
    assert sample != load_examples(data)[:2] and len({e.category for e in sample}) == 2
    restored = restore(flex_run, 3)
    expected = personalized_rouge_l(restored.model, restored.tokenizer, sample, max_examples=2,
                                    max_new_tokens=6, max_prompt_length=64)
    assert float(rows["3"][2]) == pytest.approx(expected, abs=5e-5)


def test_eval_max_examples_and_field_mapping(flex_run, workdir, capsys):
    renamed = workdir / "renamed.jsonl"
    rows = [json.loads(line) for line in (workdir / "dolly.jsonl").read_text().splitlines()]
    renamed.write_text("".join(json.dumps({"ask": r["instruction"], "reply": r["response"],
                                           "category": r["category"]}) + "\n" for r in rows))
    argv = ["--run", str(flex_run), "--clients", "0", "--data", str(renamed), "--json", "--max-examples", "12"]
    with pytest.raises(FlexmoeError, match="missing field"):
        command("eval", argv)
    capsys.readouterr()
    assert command("eval", [*argv, "--field", "instruction=ask", "--field", "response=reply"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == "12 of 40 examples (seeded sample, stratified by category)"
    assert [r["examples"] for r in result["clients"]] == [12]


@pytest.mark.parametrize("clients, message", [("0,x", "expected comma-separated"), ("9", "no client 9"), (",", "names no")])
def test_eval_refuses_bad_client_lists(flex_run, clients, message):
    with pytest.raises(FlexmoeError, match=message):
        command("eval", ["--run", str(flex_run), "--clients", clients])


def test_a_baseline_run_restores_and_refuses_a_changed_base(workdir, model_dir, data_file, tmp_path, capsys):
    run_dir = train(model_dir, data_file, tmp_path / "fedavg", "method=fedavg", "rounds=1", "eval.knowledge=false")
    assert command("eval", ["--run", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["client"]: r["rouge_l"] for r in result["clients"]} == \
        {c: r["rouge_l"] for c, r in last_evaluation(run_dir).items()}
    config = run_dir / "config.toml"
    config.write_text(config.read_text().replace(model_dir, save_model(tmp_path / "other", seed=2)))
    with pytest.raises(FlexmoeError, match="different base model"):
        command("generate", ["--run", str(run_dir), "--global", "--prompt", PROMPT])


def test_local_runs_have_no_global_model(workdir, model_dir, data_file, tmp_path):
    run_dir = train(model_dir, data_file, tmp_path / "local", "method=local", "rounds=1", "eval.knowledge=false",
                    "eval.base=false")
    with pytest.raises(FlexmoeError, match="trains no global model"):
        command("generate", ["--run", str(run_dir), "--global", "--prompt", PROMPT])


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_generate_is_interactive_on_a_terminal_and_reads_piped_lines(flex_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", Terminal(f"{PROMPT}\ndescribe the word saw\n\n"))
    assert command("generate", ["--run", str(flex_run), "--client", "0", "--max-new-tokens", "4"]) == 0
    interactive = capsys.readouterr().out
    assert "client 0" in interactive and interactive.count("> ") == 3  # two answers, then an empty line quits
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\ndescribe the word saw\n"))
    assert command("generate", ["--run", str(flex_run), "--client", "0", "--max-new-tokens", "4"]) == 0
    piped = capsys.readouterr().out
    assert piped.count("### ") == 2 and "> " not in piped


def every_method():
    from flexmoe.methods.registry import registered

    return [(name,) for name in registered()] + [
        ("flex", "flex.federate_routers=true"),  # trained routers travel with the base weights
        ("fedavg", "lora.scope=full"),  # no adapter: the trained weights are the model
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", every_method(), ids=lambda m: "-".join(m).replace("=", "-"))
def test_every_methods_export_loads_with_plain_transformers_and_peft(model_dir, data_file, tmp_path, method):
    """Each method's export, with and without --merge, loaded as someone without flexmoe loads
    it, gives load_personalized's logits exactly and the run's own model's (up to the merge)."""
    import flexmoe
    from flexmoe.engine.export import export_client
    from flexmoe.engine.restore import restore

    name, *extra = method
    run_dir = train(model_dir, data_file, tmp_path / "run", f"method={name}", *extra, "rounds=1", "num_clients=2",
                    "clients_per_round=2", "eval.knowledge=false", "eval.base=false")
    reference = restore(run_dir, 1)
    expected = logits(reference.model, reference.tokenizer)
    layouts = set()
    for merge in (False, True):
        out = export_client(run_dir, 1, tmp_path / f"export-{merge}", merge=merge)
        layouts.add(json.loads((out / "flexmoe-export.json").read_text())["layout"])
        got = logits(plain_load(out), reference.tokenizer)
        assert torch.equal(got, logits(flexmoe.load_personalized(out)[0], reference.tokenizer))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    grafted = reference.checkpoint.method.grafts
    assert layouts == ({"grafted"} if grafted else {"merged"} if "lora.scope=full" in extra else {"adapter", "merged"})


def test_state_dir_points_at_clients_kept_elsewhere(flex_run, tmp_path, capsys):
    run_copy, state = tmp_path / "run", tmp_path / "node-state"
    shutil.copytree(flex_run, run_copy)
    (run_copy / "clients").rename(state)
    argv = ["--run", str(run_copy), "--client", "2", "--prompt", PROMPT, "--max-new-tokens", "4"]
    with pytest.raises(FlexmoeError, match="client 2 has no personal.safetensors"):
        command("generate", argv)
    assert command("generate", [*argv, "--state-dir", str(state)]) == 0
    moved = capsys.readouterr().out
    assert command("generate", ["--run", str(flex_run), *argv[2:]]) == 0
    assert moved == capsys.readouterr().out


@pytest.fixture(scope="module")
def bf16_run(workdir, data_file) -> Path:
    """A short run over a base checkpoint stored in bfloat16 (as the shipped tiny base is)."""
    from transformers import AutoModelForCausalLM

    path = workdir / "base-bf16"
    save_model(path, seed=1)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    return train(str(path), data_file, workdir / "bf16-run", "rounds=1", "eval.knowledge=false", "eval.base=false")


def weights_dtypes(export_dir: Path) -> dict[str, set[str]]:
    """{"graft": dtypes of the graft's tensors, "base": of the others} in the export's weights."""
    from safetensors import safe_open

    dtypes = {"graft": set(), "base": set()}
    for file in export_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                dtypes["graft" if ".graft." in name else "base"].add(str(handle.get_slice(name).get_dtype()))
    return dtypes


def test_export_keeps_the_bases_dtype(bf16_run, tmp_path, capsys):
    import warnings

    from transformers import AutoModelForCausalLM

    import flexmoe
    from flexmoe.config import load_config
    from flexmoe.engine.restore import restore

    plain, forced = tmp_path / "plain", tmp_path / "forced"
    with warnings.catch_warnings(record=True) as caught:  # nothing from our calls into transformers/PEFT
        warnings.simplefilter("always")
        assert command("export", ["--run", str(bf16_run), "--client", "1", "--out", str(plain)]) == 0
        model, tokenizer = flexmoe.load_personalized(plain, dtype=torch.bfloat16)
    assert [str(w.message) for w in caught] == []
    assert "bfloat16" in capsys.readouterr().out
    assert weights_dtypes(plain) == {"base": {"BF16"}, "graft": {"F32", "I64"}}  # the graft stays as trained
    assert json.loads((plain / "flexmoe-export.json").read_text())["dtype"] == "bfloat16"
    got = logits(plain_load(plain, dtype=torch.bfloat16), tokenizer)
    assert torch.equal(got, logits(model, tokenizer))
    reference = restore(bf16_run, 1)  # fp32 compute, LoRA unmerged: the export differs by the bf16 rounding of the merge
    expected = logits(reference.model, reference.tokenizer)
    # how far the rounding goes depends on the trained LoRA, so on the CPU that trained it (7% of the
    # largest logit on an AMX Xeon, under 5% on an AMD EPYC): bounded against what training moved
    untouched = logits(AutoModelForCausalLM.from_pretrained(load_config(bf16_run / "config.toml").model,
                                                            dtype=torch.float32).eval(), tokenizer)
    error = (got.float() - expected).abs()
    assert error.mean() < 0.2 * (untouched - expected).abs().mean()  # the training is in the export
    assert error.max() < 0.1 * expected.abs().max()
    assert command("export", ["--run", str(bf16_run), "--client", "1", "--out", str(forced),
                              "--dtype", "float32"]) == 0
    assert weights_dtypes(forced) == {"base": {"F32"}, "graft": {"F32", "I64"}}
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(plain) < 0.6 * size(forced)
