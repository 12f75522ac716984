"""Sweeps: a grid of simulate options → one simulation per point → one results row per point.

A grid is a TOML file whose keys are simulate options spelled without their dashes (`hbm-ratio`
or `hbm_ratio`), each a list of values (a bare value is a one-value list); the points are the
cartesian product, in file order. Every point is one `simulate(cfg, workers=1)` on a local
process pool or on Dask workers; its row is the point's full configuration (defaults filled in),
its status and error, and every summary key. Each finished point is written at once as a
one-row parquet part in a hidden `.RESULTS.partial/` folder beside RESULTS; at the end the parts
(and, on resume, the rows already in RESULTS) are merged into RESULTS atomically. An interrupted
sweep so loses at most the points in flight, and `resume=True` skips every point that has an
`ok` row already (failed points are retried). One point per distinct policy replay runs first, so
that the schedule cache (workload/cache.py) serves the rest.

One concept past ~400 lines: grid parsing, point identity, the two engines (process pool, Dask) and
the incremental parquet merge are the one resumable-sweep contract; each part is tested through it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tiersim.errors import TiersimError
from tiersim.fileio import atomic_path
from tiersim.policy import PolicyConfig
from tiersim.sim.config import SimConfig
from tiersim.sim.run import simulate
from tiersim.specs import MODELS, hardware_names, hardware_spec, model_spec
from tiersim.version import __version__

ENGINES = ("local", "dask")
# The simulate command's defaults for the two options SimConfig takes resolved (tests/test_sweep.py
# checks them, and the grid keys, against `tiersim simulate`).
DEFAULT_MODEL = "r1-qwen-14b"
DEFAULT_HARDWARE = "h200-sxm"
VERSION_KEY = b"tiersim_version"
CONNECT_TIMEOUT_S = 4.0
STATUS_OK, STATUS_FAILED = "ok", "failed"
# Summary keys that vary from run to run of the same point (left out when comparing rows).
WALL_COLUMNS = ("sim_wall_s",)


def _field_defaults(cls, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: (f.default if f.default is not MISSING else f.default_factory())
            for f in fields(cls) if f.name not in skip}


def _field_kinds(cls, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """bool, int, float or str for every field, from its annotation."""
    out = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        t = str(f.type)
        out[f.name] = next((k for k in ("bool", "float", "int") if k in t), "str")
    return out


# Grid keys: the two spec names, then every SimConfig and PolicyConfig field, so they never drift.
SIM_KEYS = _field_defaults(SimConfig, skip=("model", "hardware", "policy"))
POLICY_KEYS = _field_defaults(PolicyConfig)
DEFAULTS: dict[str, Any] = {"model": DEFAULT_MODEL, "hardware": DEFAULT_HARDWARE, **SIM_KEYS, **POLICY_KEYS}
KINDS: dict[str, str] = {"model": "str", "hardware": "str",
                         **_field_kinds(SimConfig, skip=("model", "hardware", "policy")), **_field_kinds(PolicyConfig)}
_PATH_KEYS = ("model", "hardware", "trace")
# Older spellings of grid keys, kept so existing grids still run (the CLI renamed --model-spec to --model).
KEY_ALIASES = {"model_spec": "model"}


def grid_keys() -> tuple[str, ...]:
    """Every accepted grid key, canonical spelling (underscores)."""
    return tuple(DEFAULTS)


def _accepted() -> str:
    return ", ".join(k.replace("_", "-") for k in DEFAULTS)


def _check_value(where: str, key: str, value: Any) -> Any:
    """A TOML value of the right kind for `key`; ints become floats for float options."""
    kind = KINDS[key]
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str)}[kind]
    if not ok:
        word = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kind]
        raise TiersimError(f"{where}: {key} = {value!r} is not {word}")
    return float(value) if kind == "float" else value


@dataclass(frozen=True, slots=True)
class Point:
    """One grid point: its index in the grid, every simulate input (defaults filled in), and the resolved config."""

    index: int
    values: dict[str, Any]
    config: SimConfig

    @property
    def key(self) -> str:
        """Canonical JSON of the inputs: the point's identity across runs and grids."""
        return json.dumps(self.values, sort_keys=True)

    @property
    def point_id(self) -> str:
        """Short digest of `key`."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Grid:
    """Axes (canonical key → values, in file order) and the folder that relative paths start from."""

    axes: tuple[tuple[str, tuple], ...]
    base_dir: Path = Path(".")
    source: str = "grid"

    def __post_init__(self) -> None:
        if not self.axes:
            raise TiersimError(f"{self.source}: the grid names no option; accepted keys: {_accepted()}")
        for key, values in self.axes:
            if key not in DEFAULTS:
                raise TiersimError(f"{self.source}: grid key {key!r} is not a simulate option; accepted: {_accepted()}")
            if not values:
                raise TiersimError(f"{self.source}: grid key {key!r} has an empty list; give at least one value")
            seen = set()
            for v in values:
                if (type(v), v) in seen:
                    raise TiersimError(f"{self.source}: grid key {key!r} lists {v!r} twice")
                seen.add((type(v), v))

    @property
    def size(self) -> int:
        """Number of points."""
        n = 1
        for _, values in self.axes:
            n *= len(values)
        return n

    def points(self) -> list[Point]:
        """Every point, each config resolved and checked (a bad value names the point)."""
        keys = [k for k, _ in self.axes]
        specs: dict[tuple[str, str], Any] = {}
        names = {"model": tuple(MODELS), "hardware": hardware_names()}
        out = []
        for index, combo in enumerate(itertools.product(*(v for _, v in self.axes))):
            values = {**DEFAULTS, **dict(zip(keys, combo))}
            label = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo))
            try:
                config = self._config(values, specs, names)
            except TiersimError as e:
                raise TiersimError(f"{self.source}, point {label}: {e}") from None
            out.append(Point(index, values, config))
        return out

    def _path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def _config(self, values: dict[str, Any], specs: dict, names: dict) -> SimConfig:
        """SimConfig of one point; model and hardware are resolved once per distinct value."""
        def spec(kind: str, value: str, load):
            if (kind, value) not in specs:
                specs[kind, value] = load(value if value in names[kind] else self._path(value))
            return specs[kind, value]

        sim = {k: values[k] for k in SIM_KEYS}
        if sim["trace"] is not None:
            sim["trace"] = self._path(sim["trace"])
        return SimConfig(model=spec("model", values["model"], model_spec),
                         hardware=spec("hardware", values["hardware"], hardware_spec),
                         policy=PolicyConfig(**{k: values[k] for k in POLICY_KEYS}), **sim)


def parse_grid(data: dict[str, Any], base_dir: Path = Path("."), source: str = "grid") -> Grid:
    """A Grid from a TOML-like mapping: keys with dashes or underscores, each a list of values."""
    axes: dict[str, tuple] = {}
    for raw, values in data.items():
        key = raw.replace("-", "_")
        key = KEY_ALIASES.get(key, key)
        if key not in DEFAULTS:
            raise TiersimError(f"{source}: grid key {raw!r} is not a simulate option; accepted: {_accepted()}")
        if key in axes:
            raise TiersimError(f"{source}: grid key {raw!r} is given twice (spellings name the same option)")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise TiersimError(f"{source}: grid key {raw!r} has an empty list; give at least one value")
        axes[key] = tuple(_check_value(source, key, v) for v in values)
    return Grid(tuple(axes.items()), base_dir, source)


def read_grid(path: str | os.PathLike) -> Grid:
    """Parse a grid TOML file; relative paths in it (trace, hardware or model files) start from its folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TiersimError(f"{path}: no such grid file; accepted: a TOML file of simulate options, each a list") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TiersimError(f"{path}: cannot read the grid ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise TiersimError(f"{path}: invalid TOML ({e})") from None
    return parse_grid(data, path.parent, str(path))


# -- one point ------------------------------------------------------------------------------------
def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    if not isinstance(e, TiersimError) and e.__traceback__ is not None:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        text += f" (at {Path(frame.filename).name}:{frame.lineno})"
    return text[:1000]


def failure(e: BaseException) -> dict[str, Any]:
    """The outcome of a point that raised."""
    return {"status": STATUS_FAILED, "error": _error_text(e)}


def simulate_point(cfg: SimConfig) -> dict[str, Any]:
    """Run one point (no nested process pool) and flatten its summary; never raises."""
    try:
        s = simulate(cfg, workers=1).summary
    except Exception as e:  # a failed point is a row, not the end of the sweep
        return failure(e)
    c = s["config"]
    out = {"status": STATUS_OK, "error": None, "model_name": c["model"]["name"], "hardware_name": c["hardware"]["name"],
           "hardware_link": c["hardware"]["link"]}
    for k, v in s.items():
        if k != "config":
            out[f"summary_{k}" if k in DEFAULTS or k in out else k] = v
    return out


def point_row(point: Point, outcome: dict[str, Any]) -> dict[str, Any]:
    """The results row of a point: identity, inputs, outcome, version."""
    return {"point_id": point.point_id, **point.values, **outcome, "tiersim_version": __version__}


# -- results files ---------------------------------------------------------------------------------
def partial_dir(out: str | os.PathLike) -> Path:
    """The hidden folder beside RESULTS that holds the finished points of an unfinished sweep."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A table of rows whose keys may differ (failed rows lack the summary), columns in first-seen order."""
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    table = pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns})
    return table.replace_schema_metadata({VERSION_KEY: __version__.encode()})


def _write_table(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_results_table(path: str | os.PathLike) -> pa.Table:
    """A results file as an arrow table, checked to be one (any tiersim version)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise TiersimError(f"{path}: not a readable parquet file ({e}); accepted: a results file of tiersim sweep") from None
    missing = [c for c in ("point_id", "status") if c not in table.column_names]
    if missing:
        raise TiersimError(f"{path}: not a tiersim sweep results file (no {', '.join(missing)} column)")
    return table


def file_version(table: pa.Table) -> str | None:
    """The tiersim version that wrote a results table (metadata, else its column)."""
    meta = table.schema.metadata or {}
    if VERSION_KEY in meta:
        return meta[VERSION_KEY].decode()
    if "tiersim_version" in table.column_names and len(table):
        return str(table.column("tiersim_version")[0].as_py())
    return None


def _check_version(table: pa.Table, path: Path) -> None:
    version = file_version(table)
    if version != __version__:
        raise TiersimError(f"{path} was written by tiersim {version or 'of unknown version'}, this is tiersim "
                           f"{__version__}: its rows are not comparable; rerun without --resume to start over "
                           f"(or resume with tiersim {version})")


def read_results(path: str | os.PathLike):
    """A results file as a pandas DataFrame (any tiersim version)."""
    return read_results_table(path).to_pandas()


def _previous_rows(out: Path, resume: bool) -> tuple[list[dict], list[dict]]:
    """Rows already in RESULTS and in its partial folder (resume only; both version-checked)."""
    folder = partial_dir(out)
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not resume:
        if parts:
            raise TiersimError(f"{folder} holds {len(parts)} finished points of an unfinished sweep of {out}: "
                               f"pass --resume to keep them, or delete that folder to start over")
        return [], []
    existing = []
    if out.exists():
        table = read_results_table(out)
        _check_version(table, out)
        existing = table.to_pylist()
    partial = []
    for p in parts:
        table = read_results_table(p)
        _check_version(table, p)
        partial.extend(table.to_pylist())
    return existing, partial


def _merge(points: list[Point], rows: list[dict]) -> list[dict]:
    """One row per point id (the last one wins): this grid's points in grid order, then older points."""
    by_id: dict[str, dict] = {}
    for r in rows:
        by_id.pop(r["point_id"], None)
        by_id[r["point_id"]] = r
    order = {p.point_id: p.index for p in points}
    mine = sorted((r for r in by_id.values() if r["point_id"] in order), key=lambda r: order[r["point_id"]])
    return mine + [r for r in by_id.values() if r["point_id"] not in order]


# -- engines -----------------------------------------------------------------------------------------
Submit = Callable[[list[SimConfig]], Iterator[tuple[int, dict[str, Any]]]]


def _in_process(configs: list[SimConfig]) -> Iterator[tuple[int, dict[str, Any]]]:
    return ((i, simulate_point(c)) for i, c in enumerate(configs))


def _pool_submit(pool: ProcessPoolExecutor, configs: list[SimConfig]) -> Iterator[tuple[int, dict[str, Any]]]:
    futures = {pool.submit(simulate_point, c): i for i, c in enumerate(configs)}  # submitted now, before any thread

    def outcomes():
        for f in as_completed(futures):
            try:
                yield futures[f], f.result()
            except Exception as e:  # a worker process died (e.g. out of memory)
                yield futures[f], failure(e)
    return outcomes()


@contextlib.contextmanager
def local_engine(workers: int) -> Iterator[Submit]:
    """A process pool of `workers` (forked where possible); 1 runs in this process."""
    if workers <= 1:
        yield _in_process
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        yield functools.partial(_pool_submit, pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _distributed():
    try:
        import dask.distributed
    except ImportError:
        raise TiersimError("--engine dask needs dask[distributed]: pip install 'tiersim[dist]'") from None
    return dask.distributed


_ADDRESS = re.compile(r"^([a-z0-9+]+://)?(\[[0-9a-fA-F:]+\]|[^:/\s\[\]]+):\d{1,5}$")


def connect(scheduler: str, timeout_s: float = CONNECT_TIMEOUT_S):
    """A Dask client of the scheduler at tcp://HOST:PORT, or a one-line error within `timeout_s`."""
    if not _ADDRESS.match(scheduler):
        raise TiersimError(f"--scheduler {scheduler!r} is not an address; accepted: tcp://HOST:PORT")
    distributed = _distributed()
    try:
        return distributed.Client(scheduler, timeout=timeout_s, set_as_default=False)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TiersimError(f"cannot reach the Dask scheduler at {scheduler} within {timeout_s:g} s ({reason}); "
                           f"start one with `dask scheduler`, or leave --scheduler out for a local cluster") from None


def _dask_submit(client, configs: list[SimConfig]) -> Iterator[tuple[int, dict[str, Any]]]:
    distributed = _distributed()
    futures = client.map(simulate_point, configs, pure=False)
    index = {f.key: i for i, f in enumerate(futures)}

    def outcomes():
        try:
            for f in distributed.as_completed(futures, loop=client.loop):
                try:
                    yield index[f.key], f.result()
                except Exception as e:  # e.g. KilledWorker: the point crashed its worker repeatedly
                    yield index[f.key], failure(e)
        finally:
            client.cancel(futures)
    return outcomes()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Processes started inside inherit an ignored SIGINT: Ctrl-C reaches this process, which shuts them down."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to shield
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def dask_engine(workers: int, scheduler: str | None = None) -> Iterator[Submit]:
    """Submit to the scheduler at `scheduler`, or to a LocalCluster on loopback (`workers` processes, 1 thread each)."""
    cluster = None
    if scheduler is not None:
        client = connect(scheduler)
    else:
        distributed = _distributed()
        with _sigint_ignored():
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                               dashboard_address=None, silence_logs=logging.ERROR)
        client = distributed.Client(cluster, set_as_default=False)
    try:
        yield functools.partial(_dask_submit, client)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _engine(engine: str, workers: int | None, scheduler: str | None):
    if engine not in ENGINES:
        raise TiersimError(f"engine {engine!r} unknown; accepted: {', '.join(ENGINES)}")
    if scheduler is not None and engine != "dask":
        raise TiersimError("--scheduler needs --engine dask")
    if scheduler is not None and workers is not None:
        raise TiersimError("--workers does not apply with --scheduler: the Dask cluster has its own workers")
    if workers is not None and workers < 1:
        raise TiersimError(f"--workers must be >= 1, got {workers}")
    n = workers or os.cpu_count() or 1
    return local_engine(n) if engine == "local" else dask_engine(n, scheduler)


# -- the sweep -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SweepStats:
    """What a sweep did."""

    points: int  # in the grid
    skipped: int  # already done (resume)
    ran: int  # simulated now
    failed: int  # of those, failed
    rows: int  # in RESULTS afterwards
    wall_s: float
    errors: tuple[str, ...]  # the first few distinct errors

    @property
    def points_per_s(self) -> float:
        """Simulated points per second of wall time (engine start included)."""
        return self.ran / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return {**{f: getattr(self, f) for f in self.__dataclass_fields__}, "errors": list(self.errors),
                "points_per_s": self.points_per_s}


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[bool], None]]:
    """A rich progress bar over points on stderr, or nothing; the callback takes `failed`."""
    if not enabled or total == 0:
        yield lambda failed: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("points, {task.fields[failed]} failed"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("sweep", total=total, failed=0)
        failed_count = [0]

        def update(failed: bool) -> None:
            failed_count[0] += failed
            bar.update(task, advance=1, failed=failed_count[0])

        yield update


def schedule_phases(points: list[Point]) -> list[list[int]]:
    """Indices in two phases: one point per distinct policy replay first, then the rest.

    The TierSchedules of a point depend only on its trace, policy, generated length and seed, and
    the schedule cache (workload/cache.py) shares them between workers; running one leader per replay
    first keeps two workers from replaying the same schedules at once on a cold cache.
    """
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(points):
        v = p.values
        key = (v["trace"], v["gen_tokens"], v["seed"], *(v[k] for k in POLICY_KEYS))
        groups.setdefault(key, []).append(i)
    leaders = [g[0] for g in groups.values()]
    rest = sorted(i for g in groups.values() for i in g[1:])
    return [phase for phase in (leaders, rest) if phase]


def run_sweep(grid: Grid, out: str | os.PathLike, engine: str = "local", workers: int | None = None,
              scheduler: str | None = None, resume: bool = False, progress: bool = False,
              on_point: Callable[[int, int], None] | None = None) -> SweepStats:
    """Simulate every point of `grid` not yet done and merge all rows into `out` (parquet) atomically.

    Everything is checked, and the engine started (or the scheduler reached), before anything is
    written. `on_point(k, n)` runs after the k-th of n points is saved (tests use it to interrupt).
    """
    start = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise TiersimError(f"--out {out} is a folder; accepted: a results file path such as results.parquet")
    points = grid.points()
    existing, partial = _previous_rows(out, resume)
    done = {r["point_id"] for r in existing + partial if r["status"] == STATUS_OK}
    todo = [p for p in points if p.point_id not in done]
    phases = schedule_phases(todo)
    folder = partial_dir(out)
    failed, errors, k = 0, {}, 0
    with _engine(engine, workers, scheduler) as submit:
        # The first submission starts the pool (forks) before the progress bar starts its thread.
        first = submit([todo[i].config for i in phases[0]]) if phases else iter(())
        with _progress(progress, len(todo)) as advance:
            for n, phase in enumerate(phases):
                for j, outcome in (first if n == 0 else submit([todo[i].config for i in phase])):
                    row = point_row(todo[phase[j]], outcome)
                    folder.mkdir(parents=True, exist_ok=True)
                    _write_table(rows_table([row]), folder / f"{row['point_id']}.parquet")
                    partial.append(row)
                    bad = row["status"] != STATUS_OK
                    failed += bad
                    if bad and len(errors) < 5:
                        errors.setdefault(row["error"], None)
                    advance(bad)
                    k += 1
                    if on_point is not None:
                        on_point(k, len(todo))
    rows = _merge(points, existing + partial)
    _write_table(rows_table(rows), out)
    shutil.rmtree(folder, ignore_errors=True)
    return SweepStats(points=len(points), skipped=len(points) - len(todo), ran=len(todo), failed=failed,
                      rows=len(rows), wall_s=time.perf_counter() - start, errors=tuple(errors))
