"""Compressed messages (`[wire]`): the codec's hand values and round trips, error feedback, bytes on
the wire, and both engines' runs through it."""

from __future__ import annotations

import pytest
import torch

from flexmoe.config import load_config
from flexmoe.errors import FlexmoeError
from flexmoe.wire import INT8, SCALE, WireError, decode, deserialize, encode, serialize

from helpers.engine import metrics, run

pytestmark = pytest.mark.usefixtures("builtin_is_synthetic")


def wire(*overrides: str):
    return load_config(None, list(overrides)).wire


def test_fp32_is_the_identity_and_the_default():
    tensors = {"a": torch.randn(3, 4), "round": torch.tensor([2])}
    coded, residual = encode(tensors, wire())
    assert coded is tensors and residual == {}


def test_int8_per_row_hand_values():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]])
    coded, _ = encode({"w": x}, wire("wire.quantize=int8"))
    assert set(coded) == {INT8 + "w", SCALE + "w"}
    assert coded[SCALE + "w"].tolist() == pytest.approx([1 / 127, 0.0, 2.0])
    assert coded[INT8 + "w"].tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]  # round half to even: 63.5 -> 64
    back = decode(coded)["w"]
    assert back[0].tolist() == pytest.approx([1.0, -64 / 127, 32 / 127])
    assert back[1].tolist() == [0.0, 0.0, 0.0] and back[2].tolist() == [-254.0, 128.0, 0.0]


@pytest.mark.parametrize("setting,bound", [("wire.dtype=bf16", 2**-8), ("wire.dtype=fp16", 2**-11),
                                           ("wire.quantize=int8", 0.5 / 127)])
def test_round_trip_error_is_within_the_formats_rounding(setting, bound):
    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(16, 32, generator=generator), "b": torch.randn(7, generator=generator),
               "count": torch.tensor([3], dtype=torch.int64)}
    coded, _ = encode(tensors, wire(setting))
    back = decode(coded)
    assert back["count"].dtype == torch.int64 and back["count"].item() == 3
    for name in ("a", "b"):
        assert back[name].dtype == torch.float32 and back[name].shape == tensors[name].shape
        if setting.endswith("int8"):  # half a step of the row's scale
            rows = tensors[name].reshape(tensors[name].shape[0] if tensors[name].dim() > 1 else 1, -1)
            limit = (rows.abs().amax(dim=1, keepdim=True) * bound).expand_as(rows).reshape(tensors[name].shape)
        else:  # half an ulp, relative
            limit = tensors[name].abs() * bound
        assert bool(((back[name] - tensors[name]).abs() <= limit + 1e-12).all())
    assert all(t.dtype in (torch.int8, torch.int16, torch.float16, torch.float32, torch.int64) for t in coded.values())


def test_uplink_travels_as_the_difference_from_what_was_received():
    received = {"w": torch.full((2, 4), 100.0)}
    trained = {"w": received["w"] + torch.tensor([[0.01, -0.02, 0.0, 0.005]] * 2)}
    coded, _ = encode(trained, wire("wire.quantize=int8"), reference=received)
    # the scale is that of the update (0.02 / 127), not of the weights (100 / 127)
    assert coded[SCALE + "w"].tolist() == pytest.approx([0.02 / 127] * 2, rel=1e-3)  # float32 of 100.0 - 0.02
    back = decode(coded, reference=received)["w"]
    assert float((back - trained["w"]).abs().max()) <= 0.02 / 254 + 1e-5


def test_error_feedback_carries_the_rounding_error_into_the_next_message():
    settings = wire("wire.quantize=int8", "wire.error_feedback=true")
    update = {"w": torch.tensor([[1.0, 0.3, 0.004]])}
    coded, residual = encode(update, settings, residual={})
    sent = decode(coded)["w"]
    torch.testing.assert_close(residual["w"], update["w"] - sent)  # what this rounding lost
    assert residual["w"].abs().max() > 0
    coded2, residual2 = encode(update, settings, residual=residual)
    sent2 = decode(coded2)["w"]
    torch.testing.assert_close(sent + sent2 + residual2["w"], 2 * update["w"])  # nothing lost over two rounds
    # summed over many rounds the sent values track the true sum to within one residual
    total, state = torch.zeros(1, 3), {}
    for _ in range(50):
        coded, state = encode(update, settings, residual=state)
        total += decode(coded)["w"]
    assert float((total - 50 * update["w"]).abs().max()) <= float(state["w"].abs().max()) + 1e-5


def test_compressed_messages_are_smaller_on_the_wire():
    tensors = {f"layer.{i}.lora_A.weight": torch.randn(8, 256) for i in range(4)}
    sizes = {s: len(serialize(encode(tensors, wire(*s))[0])) for s in
             [(), ("wire.dtype=bf16",), ("wire.dtype=fp16",), ("wire.quantize=int8",)]}
    fp32 = sizes[()]
    assert sizes[("wire.dtype=bf16",)] < 0.52 * fp32 and sizes[("wire.dtype=fp16",)] < 0.52 * fp32
    assert sizes[("wire.quantize=int8",)] < 0.28 * fp32  # a quarter of the values, plus scales and header
    coded = encode(tensors, wire("wire.dtype=bf16"))[0]
    assert decode(deserialize(serialize(coded))[0]).keys() == tensors.keys()


def test_a_malformed_message_is_a_wire_error():
    coded, _ = encode({"w": torch.randn(3, 2)}, wire("wire.quantize=int8"))
    with pytest.raises(WireError, match="without its scales"):
        decode({INT8 + "w": coded[INT8 + "w"]})
    with pytest.raises(WireError, match="scales"):
        decode({**coded, SCALE + "w": torch.ones(5)})
    with pytest.raises(WireError, match="reference"):
        decode(coded, reference={"w": torch.zeros(2, 3)})


@pytest.mark.parametrize("overrides,words", [
    (["wire.quantize=int8", "wire.dtype=fp16"], "leave wire.dtype"),
    (["wire.error_feedback=true"], "lossy wire"),
    (["wire.dtype=fp8"], "wire.dtype"),
])
def test_impossible_wire_settings_are_one_line(overrides, words):
    with pytest.raises(FlexmoeError, match=words) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_in_process_runs_send_compressed_bytes_and_keep_the_rounding_error(model_dir, tmp_path, monkeypatch):
    from flexmoe.engine import local_clients
    from flexmoe.files import load_checked

    sent = []
    monkeypatch.setattr(local_clients, "serialize", lambda t, m=None: sent.append(t) or serialize(t, m))
    fp32 = run(model_dir, tmp_path / "fp32", "method=fedavg")
    first_fp32 = dict(sent[0])
    sent.clear()
    int8 = run(model_dir, tmp_path / "int8", "method=fedavg", "wire.quantize=int8", "wire.error_feedback=true")
    # every floating tensor travels as int8 with its scales, both ways
    assert sent and all(k.startswith((INT8, SCALE)) for message in sent for k in message)
    assert decode(sent[0]).keys() == first_fp32.keys()
    # the bytes counted are those of the int8 messages: round 1 sends the downlink, then two uploads
    train = [r for r in metrics(tmp_path / "int8") if r["kind"] == "train" and r["round"] == 1]
    assert [r["bytes_up"] for r in train] == [len(serialize(m, {"num_examples": str(r["num_examples"])}))
                                              for m, r in zip(sent[1:3], train)]
    assert all(r["bytes_down"] == len(serialize(sent[0])) for r in train)
    # payload: one byte per value plus a float32 scale per row (LoRA B's rows are as short as the rank)
    payload = sum(t.numel() * t.element_size() for t in sent[0].values())
    assert payload == sum(t.numel() + 4 * (t.shape[0] if t.dim() > 1 else 1) for t in first_fp32.values())
    assert int8["bytes_up"] != fp32["bytes_up"]  # (tiny LoRA tensors: headers, not values, dominate here)
    for stats in (fp32, int8):
        assert stats["rounds_completed"] == 2 and 0.0 <= stats["rouge_l_avg"] <= 1.0
    state, _ = load_checked(next((tmp_path / "int8" / "clients").glob("*/state.safetensors")))
    residual = {k: v for k, v in state.items() if k.startswith("wire_residual.")}
    assert residual and all(t.dtype == torch.float32 for t in residual.values())
    # the server's global model stays float32, and moved
    server, _ = load_checked(tmp_path / "int8" / "checkpoints" / "server.safetensors")
    assert all(t.dtype == torch.float32 for t in server.values() if t.is_floating_point())


def test_an_undecodable_reply_is_rejected_and_the_round_goes_on(tmp_path):
    from flexmoe.engine.server import ServerRunner
    from flexmoe.methods.build import build_method
    from flexmoe.methods.rules import Reply

    config = load_config(None, ["method=fedavg", "wire.quantize=int8"])
    server = ServerRunner(config, build_method(config), tmp_path)
    server.start({"w": torch.zeros(2, 3)})
    down = server.downlink()
    received = decode(down)
    good, _ = encode({"w": received["w"] + 0.5}, config.wire, reference=received)
    bad = {INT8 + "w": good[INT8 + "w"]}  # its scales lost
    agg = server.aggregate([Reply(good, 3, client=0), Reply(bad, 3, client=1)])
    assert agg["rejected"] == [{"client": 1, "reason": "undecodable message: int8 tensor 'w' arrived without its scales"}]
    torch.testing.assert_close(server.global_weights["w"], torch.full((2, 3), 0.5))
