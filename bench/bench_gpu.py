"""H2D / D2H bandwidth of the GPU tier (GpuTier.copy_in / copy_out) vs plain pinned tensor.copy_.

kvtier path, per round: `--blocks` blocks of `--block` bytes, each copied with GpuTier.copy_in from
a memoryview of a SharedArena slot (the daemon's shared-memory arena, pinned with
cudaHostRegister) into its own device slot, then GpuTier.synchronize(); D2H the same with
copy_out back into the arena slots.
Limit: the same arena bytes, wrapped once as a torch tensor, copied block by block with
`device_slice.copy_(host_slice, non_blocking=True)` on the default stream, then
torch.cuda.synchronize(); one limit round runs right after each kvtier round and medians are
compared. Informative rows: the same total as ONE copy_ (the DMA engine's ceiling, no per-block
cost) and per-block copies from torch's own pinned memory (cudaHostAlloc, not cudaHostRegister).

The GPU tier runs in this process (it is not wired into kvtierd yet), so no daemon is started.
Without CUDA it prints that it needs a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import Row, add_common_args, human_bytes, log, median, parse_size, write_results

NAME = "gpu"
TITLE = "GPU tier copy_in/copy_out vs pinned tensor.copy_"


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def timed(fn) -> tuple[float, float]:
    """(seconds until fn returned = time to enqueue, seconds until the copies finished)."""
    start = time.perf_counter()
    sync = fn()
    issued = time.perf_counter()
    sync()
    return issued - start, time.perf_counter() - start


def skipped(reason: str, args) -> dict:
    print(f"bench_gpu: needs a GPU; skipped ({reason})", flush=True)
    markdown = f"## {TITLE}\n\nSkipped: needs a GPU ({reason}).\n"
    return {"bench": NAME, "title": TITLE, "rows": [], "markdown": markdown, "skipped": reason}


def measure(torch, tier, arena, device, args) -> tuple[dict, dict, bool]:
    """Runs the interleaved rounds; returns (seconds per round, seconds to enqueue, round trip ok)."""
    block, n = args.block, args.blocks
    total = block * n
    arena_view = memoryview(arena._mmap)  # noqa: SLF001 - the whole arena as one host buffer
    host = torch.frombuffer(arena_view, dtype=torch.uint8)   # the same bytes the tier copies
    host.random_(0, 256)
    expected = host[:block].clone()
    reference = torch.empty(total, dtype=torch.uint8, device=device)   # the limit's device buffer
    own_pinned = torch.empty(total, dtype=torch.uint8).pin_memory()    # torch's cudaHostAlloc memory
    own_pinned.copy_(host)
    slots, _ = tier.reserve(n)
    assert len(slots) == n
    views = [arena.view(i) for i in range(n)]
    host_blocks = [host[i * block:(i + 1) * block] for i in range(n)]
    own_blocks = [own_pinned[i * block:(i + 1) * block] for i in range(n)]
    dev_blocks = [reference[i * block:(i + 1) * block] for i in range(n)]

    def tier_in():
        for i in range(n):
            tier.copy_in(slots[i], views[i], block)
        return tier.synchronize

    def tier_out():
        for i in range(n):
            tier.copy_out(slots[i], views[i], block)
        return tier.synchronize

    def plain(dsts, srcs):
        def run():
            for dst, src in zip(dsts, srcs):
                dst.copy_(src, non_blocking=True)
            return torch.cuda.synchronize
        return run

    def one_copy(dst, src):
        def run():
            dst.copy_(src, non_blocking=True)
            return torch.cuda.synchronize
        return run

    kinds = {
        "tier_in": tier_in, "plain_in": plain(dev_blocks, host_blocks),
        "tier_out": tier_out, "plain_out": plain(host_blocks, dev_blocks),
        "one_in": one_copy(reference, host), "one_out": one_copy(host, reference),
        "own_in": plain(dev_blocks, own_blocks), "own_out": plain(own_blocks, dev_blocks),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    issue: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.warmup + args.rounds):
        for k, fn in kinds.items():   # each kvtier round is followed by its limit round
            issued, seconds = timed(fn)
            if r >= args.warmup:
                times[k].append(seconds)
                issue[k].append(issued)

    # Every round moved the same bytes, so the arena still holds them; and one block through the tier.
    tier.copy_in(slots[0], views[0], block)
    check = bytearray(block)
    tier.copy_out(slots[0], check, block).wait()
    tier.synchronize()
    correct = bytes(check) == expected.numpy().tobytes() and bool(torch.equal(host[:block], expected))
    if not correct:
        raise SystemExit("bench_gpu: the round trip changed the bytes")
    return times, issue, correct


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=parse_size, default=parse_size("2MiB"), help="block bytes (default 2MiB)")
    parser.add_argument("--blocks", type=int, default=256, help="blocks per round (default 256 = 512 MiB)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of each kind (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--device", default="cuda:0", help="CUDA device of the tier (default cuda:0)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.block <= 0 or args.block % 4096:
        parser.error("--block must be a positive multiple of 4096")
    if args.blocks < 1 or args.rounds < 1:
        parser.error("--blocks and --rounds must be at least 1")

    from kvtier.tiers.gpu import GpuTier, gpu_available, parse_device  # noqa: PLC0415

    try:
        kind, index = parse_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if kind != "cuda":
        parser.error("--device must be a CUDA device")
    ok, reason = gpu_available(index)
    if not ok:
        return skipped(reason, args)
    import torch  # noqa: PLC0415 - present once gpu_available() said yes

    from kvtier.tiers.arena import SharedArena  # noqa: PLC0415
    from kvtier.tiers.eviction import FifoPolicy  # noqa: PLC0415

    block, n = args.block, args.blocks
    total = block * n
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    log(f"gpu: {reason}; {n} x {human_bytes(block)} = {human_bytes(total)} per round, {args.rounds} rounds")

    tier = GpuTier.create(args.device, total, block, FifoPolicy())
    if tier is None:
        return skipped("GpuTier.create returned None (see the log)", args)
    arena = SharedArena("bench-gpu", [("", total)], block)
    try:
        times, issue, correct = measure(torch, tier, arena, device, args)
        pinned = arena.pinned
    finally:
        tier.close()
        arena.close()  # measure() returned: no tensor or view exports the mapping any more

    med = {k: median(v) for k, v in times.items()}
    rate = {k: gbps(total, s) for k, s in med.items()}
    rows = [
        Row(f"H2D GpuTier.copy_in, {human_bytes(block)} blocks",
            rate["tier_in"], "GB/s", rate["plain_in"], "tensor.copy_ per block, same pinned bytes",
            goal=0.9, headline=True, notes="arena pinned with cudaHostRegister" if pinned else "arena NOT pinned"),
        Row(f"D2H GpuTier.copy_out, {human_bytes(block)} blocks",
            rate["tier_out"], "GB/s", rate["plain_out"], "tensor.copy_ per block, same pinned bytes",
            goal=0.9, headline=True),
        Row("H2D tensor.copy_ per block (the limit above)", rate["plain_in"], "GB/s", rate["one_in"],
            "one copy_ of the whole round", notes="per-block cost of the copy engine path"),
        Row("D2H tensor.copy_ per block (the limit above)", rate["plain_out"], "GB/s", rate["one_out"],
            "one copy_ of the whole round"),
        Row("H2D GpuTier.copy_in vs torch's own pinned memory", rate["tier_in"], "GB/s", rate["own_in"],
            "tensor.copy_ per block from cudaHostAlloc memory",
            notes="cudaHostRegister'd arena vs torch pin_memory()"),
        Row("D2H GpuTier.copy_out vs torch's own pinned memory", rate["tier_out"], "GB/s", rate["own_out"],
            "tensor.copy_ per block into cudaHostAlloc memory"),
    ]
    labels = {"tier_in": "GpuTier.copy_in (arena)", "plain_in": "tensor.copy_ per block (arena)",
              "one_in": "one tensor.copy_ (arena)", "own_in": "tensor.copy_ per block (pin_memory)",
              "tier_out": "GpuTier.copy_out (arena)", "plain_out": "tensor.copy_ per block (arena)",
              "one_out": "one tensor.copy_ (arena)", "own_out": "tensor.copy_ per block (pin_memory)"}
    details = {"Per round (medians)": [
        {"copy": labels[k], "direction": "H2D" if k.endswith("_in") else "D2H", "GB/s": rate[k],
         "ms per round": med[k] * 1e3,
         "µs per enqueued copy": median(issue[k]) * 1e6 / (1 if k.startswith("one") else n)}
        for k in ("tier_in", "plain_in", "one_in", "own_in", "tier_out", "plain_out", "one_out", "own_out")]}
    props = torch.cuda.get_device_properties(device)
    notes = [
        f"Device: {props.name} ({reason}). Each figure is the median of {args.rounds} rounds after {args.warmup} "
        f"warm-up rounds; a round moves {n} x {human_bytes(block)} = {human_bytes(total)} one way; the eight kinds of "
        "round run interleaved in every iteration.",
        "GpuTier copies run on the tier's own CUDA stream with non_blocking=True and one event per block; the "
        "limit runs on the default stream without events. Both wait for completion at the end of the round.",
        f"Round trip verified: a block copied in and out of the tier is byte-identical ({correct}).",
    ]
    params = {"block": human_bytes(block), "blocks": n, "rounds": args.rounds, "device": args.device,
              "arena pinned": pinned}
    return write_results(NAME, TITLE, rows, params, args.out, details, notes, plot=not args.no_plot)


if __name__ == "__main__":
    main(sys.argv[1:])
