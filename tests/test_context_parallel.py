"""Context parallelism (`context_parallel_size`) on the CPU: two real gloo processes split the tiny transformer's
sequence (Ulysses, `context_parallel_comm_strategy=alltoall`, the one diffusers runs on SDPA) and must give the loss
and the LoRA gradients of one process running the whole sequence.

Tolerances (fp32): loss rtol 1e-5; each LoRA gradient tensor within 1e-4 of its largest entry (the split only
reorders sums; seen here: loss differences ~1e-8 relative, gradients ~1e-6 of their largest entry).
Ring attention (`allgather`) is refused (diffusers 0.42.1 cannot train it here: hvtune.train.context_parallel)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from hvtune.errors import UserError
from hvtune.model.attention import key_padding_mask
from hvtune.train.context_parallel import (
    DataParallelView,
    Topology,
    bucket_split_problem,
    data_parallel_view,
    enable_context_parallel,
)

LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # gradients: max |difference| <= GRAD_RTOL x max |gradient|, per tensor


def _model(checkpointing: bool):
    """The tiny transformer with hvtune's attention and a LoRA whose B is not zero (so both A and B get gradients)."""
    from peft import LoraConfig

    from hvtune.model.attention import use_key_padding_attention
    from hvtune.testing.tiny_model import build_components

    transformer = build_components("t2v")["transformer"].float()
    transformer.requires_grad_(False)
    use_key_padding_attention(transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(7)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def _inputs(padded: bool) -> tuple[dict, torch.Tensor]:
    """Two samples, 2 latent frames of 4x6 (48 video tokens). Not `padded`: 6 Qwen + 2 ByT5 tokens, all valid (no
    mask at all). `padded`: 5 Qwen tokens, the second caption 2 shorter (a key mask), and 7 text tokens, which the
    context-parallel module pads to 8 (masked) to split them in two."""
    from hvtune.model.architectures import TINY_TRANSFORMER_CONFIG as C

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 5 if padded else 6, dtype=torch.int64)
    if padded:
        mask[1, 3:] = 0
    kwargs = dict(
        hidden_states=torch.randn(2, C["in_channels"], 2, 4, 6, generator=g),
        timestep=torch.tensor([300.0, 700.0]),
        encoder_hidden_states=torch.randn(2, mask.shape[1], C["text_embed_dim"], generator=g),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.randn(2, 2, C["text_embed_2_dim"], generator=g),
        encoder_attention_mask_2=torch.ones(2, 2, dtype=torch.int64),
        image_embeds=torch.zeros(2, 0, C["image_embed_dim"]),
        return_dict=False,
    )
    return kwargs, torch.randn(2, C["out_channels"], 2, 4, 6, generator=g)


def _step(model, padded: bool) -> tuple[float, dict]:
    kwargs, target = _inputs(padded)
    loss = torch.nn.functional.mse_loss(model(**kwargs)[0], target)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, port: int, padded: bool, checkpointing: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    import hvtune.model.attention as attention

    seen = []  # what reaches diffusers' dispatcher: (tokens on this rank, masked, split)
    dispatch = attention.dispatch_attention_fn

    def recording(query, key, value, attn_mask=None, parallel_config=None, **kwargs):
        seen.append((query.shape[1], attn_mask is not None, parallel_config is not None))
        return dispatch(query, key, value, attn_mask=attn_mask, parallel_config=parallel_config, **kwargs)

    attention.dispatch_attention_fn = recording
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    reference = _step(_model(checkpointing), padded)  # the whole sequence on this process
    model = _model(checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = SimpleNamespace(context_parallel_size=world, context_parallel_comm_strategy="alltoall")
    view = data_parallel_view(accelerator, cfg)
    enable_context_parallel(model, params, view)
    seen.clear()
    loss, grads = _step(model, padded)
    split, seen[:] = sorted(set(seen)), []
    for g in grads.values():  # what DDP does: the mean over all processes
        torch.distributed.all_reduce(g)
        g /= world
    with torch.no_grad():  # validation: unsplit, on one process, no collective
        out = model(**_inputs(padded)[0])[0]
    numpy = {n: g.numpy().copy() for n, g in grads.items()}  # by value: a shared tensor dies with its process
    reference = (reference[0], {n: g.numpy().copy() for n, g in reference[1].items()})
    unsplit = sorted(set(seen))
    results.put(
        (rank, view.process_index, view.num_processes, reference, loss, numpy, tuple(out.shape), split, unsplit)
    )
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _run_two(padded: bool, checkpointing: bool = False) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, 2, free_port() if r == 0 else 0, padded, checkpointing, results))
        for r in range(2)
    ]
    port = procs[0]._args[2]
    procs[1]._args = (1, 2, port, padded, checkpointing, results)
    for p in procs:
        p.start()
    got = sorted([results.get(timeout=110) for _ in procs], key=lambda r: r[0])
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize(("padded", "checkpointing"), [(False, False), (True, True)], ids=["no-padding", "key-padding"])
def test_context_parallel_2_gives_the_loss_and_lora_gradients_of_one_process(padded, checkpointing):
    results = _run_two(padded, checkpointing)
    for rank, dp_rank, dp_size, (ref_loss, ref_grads), loss, grads, shape, split, unsplit in results:
        # half of the 48 video tokens and half of the 8 text tokens (7 padded to 8); a mask only with padding
        assert split == [(28, padded, True)], split
        assert unsplit == [(48 + (7 if padded else 8), padded, False)], unsplit  # validation: whole, one process
        assert (dp_rank, dp_size) == (0, 1), "both ranks of the CP group are one data-parallel rank: same samples"
        print(f"rank {rank}: loss {loss!r}, one process {ref_loss!r}")
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), rank
        assert grads.keys() == ref_grads.keys() and len(grads) == 24  # 2 blocks and the token refiner, A and B
        for name, g in grads.items():
            g, ref = torch.from_numpy(g), torch.from_numpy(ref_grads[name])
            scale = ref.abs().max().item()
            assert scale > 0, f"{name}: a zero gradient proves nothing"
            worst = (g - ref).abs().max().item() / scale
            print(f"{name}: max difference {worst:.1e} of the largest gradient")
            assert worst <= GRAD_RTOL, name
        assert shape == (2, 32, 2, 4, 6)


def test_the_key_mask_of_a_context_parallel_rank_is_its_part_of_the_text_and_padding_is_decided_on_the_whole():
    text = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # rank 0 holds the first two text tokens of both samples, all valid; it still gets a mask, like rank 1
    m0 = key_padding_mask(text, 5, part=(0, 2))
    m1 = key_padding_mask(text, 5, part=(1, 2))
    assert m0 is not None and m0.shape == (2, 1, 1, 5) and bool(m0.all())
    assert m1[1, 0, 0].tolist() == [True, True, True, False, False]
    assert key_padding_mask(torch.ones(2, 4, dtype=torch.int64), 5, part=(1, 2)) is None


def test_the_data_side_sees_data_parallel_ranks_and_a_size_that_does_not_divide_the_world_is_one_line():
    accelerator = SimpleNamespace(num_processes=4, process_index=3, device=torch.device("cpu"), is_main_process=False)
    cfg = SimpleNamespace(context_parallel_size=2, context_parallel_comm_strategy="alltoall")
    view = data_parallel_view(accelerator, cfg)
    assert isinstance(view, DataParallelView) and (view.process_index, view.num_processes) == (1, 2)
    assert view.is_main_process is False  # the rest is the accelerator's
    assert data_parallel_view(accelerator, SimpleNamespace(context_parallel_size=1)) is accelerator
    assert Topology(2, 4, 2, "alltoall").dp_rank == 1
    with pytest.raises(UserError, match="context_parallel_comm_strategy allgather: hvtune trains with alltoall"):
        data_parallel_view(
            accelerator, SimpleNamespace(context_parallel_size=2, context_parallel_comm_strategy="allgather")
        )
    with pytest.raises(UserError, match="context_parallel_size 3 does not divide the 4 processes"):
        data_parallel_view(accelerator, SimpleNamespace(context_parallel_size=3, context_parallel_comm_strategy="x"))


def test_a_bucket_whose_video_tokens_ulysses_cannot_split_evenly_is_one_line_before_the_first_step():
    """17 frames at 48x32 are 5 x 2 x 3 = 30 latent tokens: 4 Ulysses ranks cannot share them evenly."""
    view = DataParallelView(SimpleNamespace(), Topology(4, 4, 0, "alltoall"))
    manifest = SimpleNamespace(samples=[SimpleNamespace(bucket=(48, 32, 17))])
    with pytest.raises(UserError, match="does not divide the 30 video tokens of bucket 48x32, 17 frames"):
        enable_context_parallel(None, [], view, manifest)
    assert bucket_split_problem(2, manifest) is None and "30 video tokens" in bucket_split_problem(4, manifest)


def _check(tmp_path, monkeypatch, capsys, world: int, **keys) -> tuple[int, str]:
    """`hvtune check` of a project with these keys, launched on `world` processes (WORLD_SIZE)."""
    import json

    from hvtune.cli import main

    (tmp_path / "videos").mkdir(exist_ok=True)
    videos = str(tmp_path / "videos")
    backend = [
        {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": videos},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (tmp_path / "m.json").write_text(json.dumps(backend))
    (tmp_path / "c.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "m.json"), **keys}))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["check", "--config", str(tmp_path / "c.json")])
    return code, capsys.readouterr().err


def test_check_refuses_a_size_that_does_not_divide_the_processes_and_ring_attention(tmp_path, monkeypatch, capsys):
    code, err = _check(tmp_path, monkeypatch, capsys, 4, context_parallel_size=3)
    assert code == 2 and "context_parallel_size" in err and "3 does not divide the 4 processes launched" in err
    code, err = _check(tmp_path, monkeypatch, capsys, 4, context_parallel_size=2)  # SimpleTuner's default: ring
    assert code == 2 and "context_parallel_comm_strategy" in err and "ring attention cannot train" in err
    code, err = _check(tmp_path, monkeypatch, capsys, 4, context_parallel_size=2, context_parallel_comm_strategy="x")
    assert code == 2 and "allgather (ring attention) or alltoall (Ulysses)" in err
    keys = dict(context_parallel_size=2, train_batch_size=2, context_parallel_comm_strategy="alltoall")
    assert _check(tmp_path, monkeypatch, capsys, 4, **keys)[0] == 0


@pytest.mark.slow
def test_hvtune_train_on_two_processes_with_context_parallel_2_is_equivalent_to_one_process(demo_project, tmp_path):
    """The real command: `accelerate launch` (what the containers' NUM_PROCESSES=2 runs) of `hvtune train` with
    context_parallel_size 2, against one process; `hvtune compare` at tolerances far tighter than its defaults
    (loss 1e-5, LoRA 1e-5 relative L2, cosine 0.99999). Seen: losses equal, LoRA within 6e-7."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import run_hvtune

    steps = ["--max_train_steps=3", "--validation_disable=true", "--checkpointing_steps=3", "--train_batch_size=1"]
    steps.append("--context_parallel_comm_strategy=alltoall")
    one, two = tmp_path / "one", tmp_path / "cp2"
    r = run_hvtune("train", "--config", str(demo_project), f"--output_dir={one}", *steps)
    assert r.returncode == 0, r.stderr[-3000:]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "app"), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    launch = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    cmd = [*launch, "-m", "hvtune", "train", "--config", str(demo_project), f"--output_dir={two}", *steps]
    r = subprocess.run([*cmd, "--context_parallel_size=2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "each sample split over 2 processes (Ulysses attention), 1 data-parallel group(s)" in r.stdout + r.stderr
    record = json.loads((two / "run.json").read_text())  # the real process count, not the data-parallel ranks
    assert record["parallelism"] == {"world_size": 2, "sharding": "ddp", "context_parallel_size": 2}
    tight = ["--loss-rtol=1e-5", "--weight-rtol=1e-5", "--min-cosine=0.99999"]
    c = run_hvtune("compare", str(one), str(two), *tight, cwd=tmp_path)
    assert c.returncode in (0, 3) and ("EQUIVALENT" in c.stdout or "IDENTICAL" in c.stdout), c.stdout
