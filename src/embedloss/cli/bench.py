"""``embedloss bench``: speed and memory of the tiled losses against the GEMM floor and peers.

For each case (loss, N, D) it reports the median forward+backward time of

* ``floor``: the three GEMMs every exact implementation must do at these shapes —
  ``A@Bᵀ``, ``G@B``, ``Gᵀ@A`` — on preallocated buffers (a lower bound, not a loss);
* ``embedloss``: the library's loss module (``chunk_size="auto"``);
* ``plain``: a straightforward materialising implementation (``logits = a@bᵀ/τ`` and
  ``F.cross_entropy``, both ways for CLIP; ``−logsigmoid`` of every pair for SigLIP, as
  open_clip's ``SigLipLoss`` writes it);
* peers where available (``--peers``): ``openclip_style`` (both logit matrices, as open_clip's
  ``ClipLoss``) and ``pml_ntxent`` (pytorch-metric-learning's ``NTXentLoss``), from
  ``bench/peers.py``.

Times are measured in one process per case, interleaving the implementations round by round
so that a noisy machine affects them alike; ratios are taken within that process. Peak extra
memory is measured for each implementation in a fresh subprocess: the growth of the peak RSS
(``resource.getrusage``) over its value after the inputs were allocated (on CUDA: the peak of
``torch.cuda.max_memory_allocated`` over the inputs).

``--required`` runs the cases of the scale and huge-batch issues and checks their targets; ``--write`` puts the
markdown table into ``docs/benchmarks.md`` (section "Speed and memory") and the figure into
``docs/benchmarks.png``. Also callable as ``python bench/bench_losses.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "REQUIRED_CASES",
    "Case",
    "add_arguments",
    "check_huge_batches",
    "check_requirements",
    "format_markdown",
    "machine_info",
    "main",
    "run",
    "run_suite",
]

Step = Callable[[], None]
LOSSES = ("clip", "simclr", "siglip")
IMPLS = {
    "clip": ("embedloss", "plain", "openclip_style"),
    "simclr": ("embedloss", "plain", "pml_ntxent"),
    "siglip": ("embedloss", "plain"),
}
PEERS = ("openclip_style", "pml_ntxent")
#: Largest logit-matrix side a peer is run at: pytorch-metric-learning's NTXentLoss builds a
#: (positive pairs × negative pairs) matrix, cubic in N (17 GiB of RSS at 1024 rows).
PEER_MAX_ROWS = {"pml_ntxent": 512}
TEMPERATURE = {"clip": 0.07, "simclr": 0.5, "siglip": 0.1}
SIGLIP_BIAS = -10.0
#: Above this many bytes for the (rows × keys) float matrix, the floor is timed tile by tile on a
#: sample of the tiles and extrapolated, and the materialising implementations are not run.
MATERIALISE_LIMIT = 8 * 2**30
SECTION = "## Speed and memory"


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``loss`` on ``n`` pairs of dimension ``d`` (SimCLR has 2n rows)."""

    loss: str
    n: int
    d: int
    repeats: int = 3
    impls: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        """Rows (and keys) of the logit matrix."""
        return 2 * self.n if self.loss == "simclr" else self.n

    @property
    def label(self) -> str:
        """``loss N=… D=…``."""
        return f"{self.loss} N={self.n} D={self.d}"


#: The cases of the scale and huge-batch issues (float32, 2-core CPU) and their targets.
REQUIRED_CASES = (
    Case("clip", 8192, 512, repeats=5),
    Case("simclr", 4096, 512, repeats=5),
    Case("siglip", 8192, 512, repeats=5),
    Case("clip", 16384, 512, repeats=1),
    Case("clip", 131072, 128, repeats=1, impls=("embedloss",)),
    Case("simclr", 256, 512, repeats=3),  # small enough for pytorch-metric-learning
)
QUICK_CASES = (Case("clip", 2048, 256), Case("simclr", 1024, 256))


# ---------------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------------


def plain_clip(image: Tensor, text: Tensor, temperature: float = 0.07) -> Tensor:
    """The materialising CLIP loss: one logit matrix, cross-entropy over rows and columns."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits = image @ text.T / temperature  # (N, N)
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def plain_simclr(z_a: Tensor, z_b: Tensor, temperature: float = 0.5) -> Tensor:
    """The materialising NT-Xent loss over the 2N views."""
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    logits = z @ z.T / temperature  # (2N, 2N)
    logits.fill_diagonal_(float("-inf"))
    idx = torch.arange(n, device=z.device)
    return F.cross_entropy(logits, torch.cat([idx + n, idx]))


def plain_siglip(image: Tensor, text: Tensor, temperature: float = 0.1) -> Tensor:
    """The materialising SigLIP loss: every pair's ``−log σ(z·ℓ)``, ``z = 2I − 1``, over N."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits = image @ text.T / temperature + SIGLIP_BIAS  # (N, N)
    signs = 2 * torch.eye(image.shape[0], device=image.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def _peer(name: str, loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    import peers  # type: ignore[import-not-found]  # bench/peers.py, put on sys.path by the runner

    factory: Callable[..., Callable[[Tensor, Tensor], Tensor]] = getattr(peers, name)
    return factory(temperature=TEMPERATURE[loss])


def make_loss(impl: str, loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss function ``f(a, b) -> scalar`` of an implementation."""
    if impl in ("embedloss", "embedloss_dense"):
        from embedloss import CLIPLoss, SigLIPLoss, SimCLRLoss

        chunk: Literal["auto"] | None = "auto" if impl == "embedloss" else None
        if loss == "siglip":  # learnable τ and bias, as trained
            return SigLIPLoss(temperature=TEMPERATURE[loss], bias=SIGLIP_BIAS, chunk_size=chunk)
        module = CLIPLoss if loss == "clip" else SimCLRLoss
        return module(temperature=TEMPERATURE[loss], chunk_size=chunk)
    if impl == "plain":
        fn = {"clip": plain_clip, "simclr": plain_simclr, "siglip": plain_siglip}[loss]
        return lambda a, b: fn(a, b, TEMPERATURE[loss])
    if impl in PEERS:
        return _peer(impl, loss)
    raise ValueError(f"unknown implementation {impl!r}")


def make_inputs(
    case: Case, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Two ``(n, d)`` leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(case.n, case.d, generator=gen).to(device=device, dtype=dtype)
    b = (0.5 * a.float().cpu() + torch.randn(case.n, case.d, generator=gen)).to(device, dtype)
    return a.requires_grad_(), b.requires_grad_()


def loss_step(impl: str, case: Case, a: Tensor, b: Tensor) -> Step:
    """One forward+backward of an implementation (gradients returned, not accumulated)."""
    fn = make_loss(impl, case.loss)

    def step() -> None:
        torch.autograd.grad(fn(a, b), (a, b))

    return step


def floor_step(case: Case, device: str, dtype: torch.dtype, tiles: int | None = None) -> Step:
    """The three GEMMs of a (rows × rows) logit matrix: ``A@Bᵀ``, ``G@B``, ``Gᵀ@A``.

    With ``tiles`` (huge cases) the GEMMs run on row tiles of 4096 (the same FLOPs, no rows×rows
    buffer) and only the first ``tiles`` tiles are done; the caller extrapolates.
    """
    m, d = case.rows, case.d
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(m, d, generator=gen).to(device, dtype)
    b = torch.randn(m, d, generator=gen).to(device, dtype)
    da, db = torch.empty_like(a), torch.empty_like(b)
    if tiles is None:
        g = torch.empty(m, m, device=device, dtype=dtype)

        def full() -> None:
            torch.mm(a, b.T, out=g)
            torch.mm(g, b, out=da)
            torch.mm(g.T, a, out=db)

        return full
    tile = 4096
    g = torch.empty(tile, m, device=device, dtype=dtype)

    def tiled() -> None:
        db.zero_()
        for r0 in range(0, min(m, tiles * tile), tile):
            r1 = min(r0 + tile, m)
            gt = g[: r1 - r0]
            torch.mm(a[r0:r1], b.T, out=gt)
            torch.mm(gt, b, out=da[r0:r1])
            db.addmm_(gt.T, a[r0:r1])

    return tiled


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step: Step, device: str, clock: str = "wall") -> float:
    """Seconds of one ``step``: wall time, or this process's CPU time (``clock="cpu"``).

    CPU time counts only the cycles this process ran, so on a shared machine other jobs do not
    inflate it; it equals the wall time of a single-threaded run (with several threads it adds
    up every thread, spin-waits included), so use it with ``--threads 1``.
    """
    now = (
        time.process_time if clock == "cpu" and not device.startswith("cuda") else time.perf_counter
    )
    _sync(device)
    t0 = now()
    step()
    _sync(device)
    return now() - t0


def _materialise_bytes(case: Case, dtype: torch.dtype) -> int:
    return case.rows * case.rows * max(4, torch.finfo(dtype).bits // 8)


# ---------------------------------------------------------------------------------------------
# workers (run in fresh subprocesses)
# ---------------------------------------------------------------------------------------------


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def time_worker(
    case: Case, impls: Sequence[str], device: str, dtype: torch.dtype, clock: str = "wall"
) -> dict[str, Any]:
    """Median forward+backward seconds of the floor and each implementation, interleaved."""
    huge = _materialise_bytes(case, dtype) > MATERIALISE_LIMIT
    steps: dict[str, Step] = {}
    floor_scale = 1.0
    if huge:
        n_tiles = math.ceil(case.rows / 4096)
        sample = min(n_tiles, 4)
        floor_scale = n_tiles / sample
        steps["floor"] = floor_step(case, device, dtype, tiles=sample)
    else:
        steps["floor"] = floor_step(case, device, dtype)
    a, b = make_inputs(case, device, dtype)
    errors: dict[str, str] = {}
    for impl in impls:
        if huge:  # one run each is all there is time for: the memory run times it
            if impl != "embedloss":
                errors[impl] = "not run: its logit matrices alone exceed the memory"
            continue
        if case.rows > PEER_MAX_ROWS.get(impl, case.rows):
            errors[impl] = f"not run above {PEER_MAX_ROWS[impl]} rows (memory cubic in N)"
            continue
        try:
            steps[impl] = loss_step(impl, case, a, b)
        except ImportError as err:
            errors[impl] = f"not installed ({err.name})"
    if case.repeats > 1 or not huge:  # warm-up (skipped for single huge runs)
        for name, step in list(steps.items()):
            try:
                step()
            except (RuntimeError, MemoryError) as err:
                errors[name] = f"failed: {str(err).splitlines()[0][:120]}"
                del steps[name]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(case.repeats):
        for name, step in steps.items():
            times[name].append(_timed(step, device, clock))
    median = {
        name: statistics.median(ts) * (floor_scale if name == "floor" else 1.0)
        for name, ts in times.items()
    }
    return {
        "seconds": median,
        "all_seconds": times,
        "floor_mode": f"tiled, {floor_scale:g}x extrapolated from a sample" if huge else "full",
        "errors": errors,
    }


def memory_worker(
    case: Case, impl: str, device: str, dtype: torch.dtype, clock: str = "wall"
) -> dict[str, Any]:
    """Peak extra memory of one forward+backward, measured over the allocated inputs."""
    small = Case(case.loss, min(case.n, 64), case.d)
    sa, sb = make_inputs(small, device, dtype)
    loss_step(impl, small, sa, sb)()  # load code paths and thread pools before the baseline
    del sa, sb
    a, b = make_inputs(case, device, dtype)
    step = loss_step(impl, case, a, b)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = _timed(step, device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _peak_rss()
        seconds = _timed(step, device, clock)
        peak = _peak_rss() - base
    return {"peak_bytes": max(peak, 0), "seconds": seconds}


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker job described by ``spec`` (as sent by :func:`_spawn`)."""
    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    case = Case(spec["loss"], spec["n"], spec["d"], spec.get("repeats", 3))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    device, clock = spec.get("device", "cpu"), spec.get("clock", "wall")
    if spec["kind"] == "time":
        return time_worker(case, spec["impls"], device, dtype, clock)
    return memory_worker(case, spec["impl"], device, dtype, clock)


def _spawn(spec: dict[str, Any], peers_dir: str | None, timeout: float) -> dict[str, Any]:
    """Run a worker in a fresh interpreter; returns its JSON result or ``{"error": ...}``."""
    import embedloss

    src = str(Path(embedloss.__file__).resolve().parent.parent)
    paths = [src] + ([peers_dir] if peers_dir else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, "-m", "embedloss.cli.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode < 0:
            tail = f"killed by signal {-proc.returncode} (out of memory?)"
        return {"error": tail[:200]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---------------------------------------------------------------------------------------------
# suite, report
# ---------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """Everything measured for one case."""

    case: Case
    seconds: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    floor_mode: str = "full"
    rounds: dict[str, list[float]] = field(default_factory=dict)  # every timed round

    def ratio(self, impl: str, base: str = "floor") -> float | None:
        """Time of ``impl`` over the time of ``base``."""
        if impl in self.seconds and self.seconds.get(base):
            return self.seconds[impl] / self.seconds[base]
        return None

    def memory_ratio(self, impl: str, base: str = "plain") -> float | None:
        """Peak extra memory of ``impl`` over that of ``base``."""
        if impl in self.peak_bytes and self.peak_bytes.get(base):
            return self.peak_bytes[impl] / self.peak_bytes[base]
        return None


def run_suite(
    cases: Sequence[Case],
    *,
    peers: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
    peers_dir: str | None = None,
    memory: bool = True,
    timeout: float = 3600.0,
    log: Callable[[str], None] = print,
    clock: str = "wall",
) -> list[CaseResult]:
    """Run every case: one timing subprocess, then one memory subprocess per implementation."""
    results = []
    for case in cases:
        impls = list(case.impls or IMPLS[case.loss])
        if not peers:
            impls = [i for i in impls if i not in PEERS]
        res = CaseResult(case)
        common = {"loss": case.loss, "n": case.n, "d": case.d, "repeats": case.repeats}
        common.update({"device": device, "dtype": dtype, "threads": threads, "clock": clock})
        log(f"[bench] {case.label}: timing {', '.join(['floor', *impls])}")
        out = _spawn({**common, "kind": "time", "impls": impls}, peers_dir, timeout)
        if "error" in out:
            res.notes["time"] = out["error"]
        else:
            res.seconds = out["seconds"]
            res.rounds = out["all_seconds"]
            res.notes.update(out["errors"])
            res.floor_mode = out["floor_mode"]
        if memory:
            for impl in impls:
                if impl in res.notes or "time" in res.notes:
                    continue
                log(f"[bench] {case.label}: memory of {impl}")
                mem = _spawn({**common, "kind": "memory", "impl": impl}, peers_dir, timeout)
                if "error" in mem:
                    res.notes[impl] = f"memory run failed: {mem['error']}"
                    continue
                res.peak_bytes[impl] = mem["peak_bytes"]
                if impl not in res.seconds:  # huge cases: the single memory run is the timing
                    res.seconds[impl] = mem["seconds"]
                    res.notes[f"{impl} time"] = "one run (no repeats), from the memory process"
        results.append(res)
    return results


def _fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _fmt_mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:,.0f}"


def format_markdown(results: Sequence[CaseResult]) -> str:
    """One row per (case, implementation): time, ratios, peak extra memory."""
    head = (
        "| case | implementation | fwd+bwd (s) | × floor | × plain | peak extra MiB | mem × plain |\n"
        "|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in results:
        floor = r.seconds.get("floor")
        mode = "" if r.floor_mode == "full" else " (tiled sample)"
        lines.append(f"| {r.case.label} | GEMM floor{mode} | {_fmt_s(floor)} | 1.00× | – | – | – |")
        for impl in r.case.impls or IMPLS[r.case.loss]:
            if impl not in r.seconds and impl not in r.notes:
                continue
            if impl not in r.seconds:
                lines.append(f"| {r.case.label} | {impl} | {r.notes[impl]} | | | | |")
                continue
            lines.append(
                f"| {r.case.label} | {impl} | {_fmt_s(r.seconds[impl])} | "
                f"{_fmt_ratio(r.ratio(impl))} | {_fmt_ratio(r.ratio(impl, 'plain'))} | "
                f"{_fmt_mib(r.peak_bytes.get(impl))} | {_fmt_ratio(r.memory_ratio(impl))} |"
            )
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    """One target of the scale issue and its measured value."""

    text: str
    value: float | None
    limit: float
    ok: bool


def _find(results: Sequence[CaseResult], loss: str, n: int, d: int) -> CaseResult | None:
    for r in results:
        if (r.case.loss, r.case.n, r.case.d) == (loss, n, d):
            return r
    return None


def check_requirements(results: Sequence[CaseResult]) -> list[Check]:
    """The scale issue's targets, for the cases present in ``results``."""
    checks = []

    def add(text: str, value: float | None, limit: float) -> None:
        checks.append(Check(text, value, limit, value is not None and value <= limit))

    r = _find(results, "clip", 8192, 512)
    if r is not None:
        add("clip N=8192 D=512: fwd+bwd / GEMM floor", r.ratio("embedloss"), 1.6)
        add("clip N=8192 D=512: peak memory / plain", r.memory_ratio("embedloss"), 0.2)
    r = _find(results, "simclr", 4096, 512)
    if r is not None:
        add("simclr N=4096 D=512: fwd+bwd / GEMM floor", r.ratio("embedloss"), 1.3)
    r = _find(results, "clip", 16384, 512)
    if r is not None:
        add("clip N=16384 D=512: peak memory / plain", r.memory_ratio("embedloss"), 0.1)
    r = _find(results, "clip", 131072, 128)
    if r is not None:
        peak = r.peak_bytes.get("embedloss")
        add("clip N=131072 D=128: peak memory (GiB)", None if peak is None else peak / 2**30, 20.0)
    return checks


def check_huge_batches(results: Sequence[CaseResult]) -> list[Check]:
    """The huge-batch issue's targets (time over the GEMM floor), for the cases present."""
    checks = []
    targets = (
        ("clip", 8192, 512, 1.4),
        ("clip", 16384, 512, 1.4),
        ("simclr", 4096, 512, 1.15),
        ("siglip", 8192, 512, 1.15),
    )
    for loss, n, d, limit in targets:
        r = _find(results, loss, n, d)
        if r is not None:
            value = r.ratio("embedloss")
            text = f"{loss} N={n} D={d}: fwd+bwd / GEMM floor"
            checks.append(Check(text, value, limit, value is not None and value <= limit))
    r = _find(results, "siglip", 8192, 512)
    if r is not None:
        value = r.memory_ratio("embedloss")
        text = "siglip N=8192 D=512: peak memory / plain"
        checks.append(Check(text, value, 0.2, value is not None and value <= 0.2))
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    """The checks as a markdown list."""
    lines = []
    for c in checks:
        value = "not measured" if c.value is None else f"{c.value:.3g}"
        lines.append(f"- {'PASS' if c.ok else 'FAIL'}: {c.text} = {value} (target ≤ {c.limit:g})")
    return "\n".join(lines)


def machine_info(threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """CPU (or GPU), cores, memory, torch build: what a reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "memory_gib": mem_gib,
        "torch": torch.__version__,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "python": platform.python_version(),
        "os": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_section(
    results: Sequence[CaseResult], checks: Sequence[Check], machine: dict[str, Any], command: str
) -> str:
    """The "Speed and memory" section of ``docs/benchmarks.md``."""
    m = machine
    parts = [
        SECTION,
        "",
        f"Measured with `{command}` on {m['cpu']} ({m['logical_cores']} logical cores, "
        f"{m['threads']} threads, {m['memory_gib']} GiB RAM), torch {m['torch']} ({m['blas']}), "
        f"Python {m['python']}, {m['os']}; device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + ".",
        "",
        (
            "Times are this process's CPU time (single thread: other jobs on the machine do not "
            "count). "
            if m.get("clock") == "cpu"
            else ""
        )
        + "Forward+backward medians over interleaved rounds in one process per case; `× floor` is "
        "the ratio to the three GEMMs `A@Bᵀ`, `G@B`, `Gᵀ@A` at the same shapes timed in that "
        "process; peak extra memory is the growth of the peak RSS over the allocated inputs, "
        "each implementation in a fresh process. `plain` is the straightforward materialising "
        "loss (`logits = a@bᵀ/τ`, `F.cross_entropy` both ways; `−logsigmoid` of every pair for "
        "SigLIP); `openclip_style` builds both logit matrices as open_clip's `ClipLoss` does. "
        "Every per-round time is in "
        "`benchmarks.json`.",
        "",
        'How embedloss gets there (`embedloss/ops/chunked.py`, `ops/sigmoid.py`, `chunk_size="auto"`): '
        "row tiles of the logits (about 16 MiB each), never an N×N buffer, logits in base-2 units "
        "so that every exponential is an `exp2`. SimCLR / InfoNCE compute exact row "
        "log-sum-exps and their gradients during the forward (the 3 GEMMs of the floor, one "
        "`exp2` per logit); SigLIP needs no log-sum-exp and does the same (one `softplus` and "
        "one `sigmoid` per logit); CLIP merges the column log-sum-exps online and recomputes each "
        "tile once in the backward (4 GEMM units; each direction exponentiated against its own "
        "maxima, so two `exp2` per logit per pass, exact at any temperature).",
        "",
        format_markdown(results),
        "",
        "![time relative to the GEMM floor, and peak extra memory](benchmarks.png)",
    ]
    if checks:
        parts += ["", "Targets of the scale issue:", "", format_checks(checks)]
    huge = check_huge_batches(results)
    if huge:
        parts += ["", "Targets of the huge-batch issue:", "", format_checks(huge)]
    notes = [f"- {r.case.label}: {k}: {v}" for r in results for k, v in r.notes.items()]
    if notes:
        parts += ["", "Notes:", "", *notes]
    return "\n".join(parts) + "\n"


def load_results(path: Path) -> tuple[list[CaseResult], dict[str, Any]]:
    """The results and machine description of a JSON file written by a previous run."""
    payload = json.loads(Path(path).read_text())
    results = []
    for r in payload["results"]:
        c = r["case"]
        case = Case(c["loss"], c["n"], c["d"], c["repeats"], tuple(c["impls"]))
        results.append(
            CaseResult(
                case, r["seconds"], r["peak_bytes"], r["notes"], r["floor_mode"], r["rounds"]
            )
        )
    return results, payload["machine"]


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the "Speed and memory" section of the markdown file ``path``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.write_text(new)


def plot(results: Sequence[CaseResult], path: Path) -> None:
    """Bar charts of the time ratio to the floor and of the peak extra memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [r.case.label for r in results]
    impls = [
        i
        for i in ("embedloss", "embedloss_dense", "plain", *PEERS)
        if any(i in r.seconds for r in results)
    ]
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(results))]
        ratios = [r.ratio(impl) or 0.0 for r in results]
        mems = [r.peak_bytes.get(impl, 0) / 2**20 for r in results]
        bars = ax_t.bar(xs, ratios, width, label=impl)
        ax_t.bar_label(bars, labels=[f"{r:.2f}" if r else "" for r in ratios], fontsize=7)
        ax_m.bar(xs, mems, width, label=impl)
    for ax in (ax_t, ax_m):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(results))])
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        if results:  # an empty run has nothing to name
            ax.legend(fontsize=8)
    ax_t.axhline(1.0, color="k", lw=0.8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("fwd+bwd time / 3-GEMM floor (log)")
    if any(v > 0 for r in results for v in r.peak_bytes.values()):
        ax_m.set_yscale("log")
    ax_m.set_ylabel("peak extra memory (MiB)")
    fig.suptitle("embedloss: time relative to the GEMM floor, and memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _parse_case(text: str) -> Case:
    try:
        loss, n, d = text.split(":")
        case = Case(loss, int(n), int(d))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a case is LOSS:N:D, e.g. clip:8192:512, got {text!r}"
        ) from None
    if loss not in LOSSES or case.n < 2 or case.d < 1:
        raise argparse.ArgumentTypeError(
            f"a case is LOSS:N:D with LOSS in {LOSSES}, N >= 2, got {text!r}"
        )
    return case


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``embedloss bench`` to ``parser``."""
    parser.add_argument(
        "--required",
        action="store_true",
        help="the scale and huge-batch issues' cases and targets "
        "(clip N=8192/16384/131072, simclr N=4096, siglip N=8192)",
    )
    parser.add_argument(
        "--case",
        type=_parse_case,
        action="append",
        metavar="LOSS:N:D",
        help="a case to run (repeatable), e.g. clip:8192:512",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also time the installed peers (openclip_style, pytorch-metric-learning)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="time steps by wall clock (default) or by this process's CPU time (with "
        "--threads 1: unaffected by other jobs on a shared machine)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--write",
        action="store_true",
        help="write docs/benchmarks.md (section 'Speed and memory') and docs/benchmarks.png",
    )
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="docs folder for --write")
    parser.add_argument("--peers-dir", default=None, help="folder of peers.py (default: ./bench)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="FILE",
        help="report a previous run's JSON instead of measuring (with --write: "
        "re-render the docs section and plot)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _cases(args: argparse.Namespace) -> list[Case]:
    """The cases ``args`` ask for (``--case``, ``--required`` or the quick ones)."""
    if args.case:
        cases = list(args.case)
    elif args.required:
        cases = list(REQUIRED_CASES)
    else:
        cases = list(QUICK_CASES)
    if args.repeats is not None:
        cases = [Case(c.loss, c.n, c.d, max(1, args.repeats), c.impls) for c in cases]
    return cases


def _measure(args: argparse.Namespace) -> tuple[list[CaseResult], dict[str, Any]]:
    """Run the suite for ``args``; the machine description records the timing flags."""
    peers_dir = args.peers_dir
    if peers_dir is None and Path("bench", "peers.py").exists():
        peers_dir = str(Path("bench").resolve())
    clock = getattr(args, "clock", "wall")
    results = run_suite(
        _cases(args),
        peers=args.peers or args.required,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        peers_dir=peers_dir,
        memory=not args.no_memory,
        timeout=args.timeout,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        clock=clock,
    )
    flags = " --required" if args.required else ""
    flags += f" --threads {args.threads}" if args.threads else ""
    flags += " --clock cpu" if clock == "cpu" else ""
    return results, {**machine_info(args.threads, args.device), "clock": clock, "flags": flags}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; 0 on success, 1 if a target is missed."""
    if args.worker is not None:
        print(json.dumps(worker_main(json.loads(args.worker))))
        return 0
    if args.from_json is not None:
        results, machine = load_results(args.from_json)
    else:
        results, machine = _measure(args)
    checks = check_requirements(results)
    huge = check_huge_batches(results)
    print(format_markdown(results))
    for group in (checks, huge):
        if group:
            print()
            print(format_checks(group))
    payload = {
        "machine": machine,
        "results": [
            {
                **asdict(r),
                "case": asdict(r.case),
                "ratio_floor": r.ratio("embedloss"),
                "memory_ratio_plain": r.memory_ratio("embedloss"),
            }
            for r in results
        ],
        "checks": [asdict(c) for c in (*checks, *huge)],
    }
    json_path = args.json if args.from_json is None else None
    if args.write:
        args.docs.mkdir(parents=True, exist_ok=True)
        command = "python bench/bench_losses.py" + machine.get("flags", "")
        write_section(
            args.docs / "benchmarks.md", format_section(results, checks, machine, command)
        )
        plot(results, args.docs / "benchmarks.png")
        if args.from_json is None:
            json_path = json_path or args.docs / "benchmarks.json"
    if json_path is not None:
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(c.ok for c in (*checks, *huge)) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m embedloss.cli.bench`` (the same options as ``embedloss bench``)."""
    parser = argparse.ArgumentParser(prog="embedloss bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
