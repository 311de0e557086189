"""`regscale compare`: training runs side by side, from the same MLflow data the UI shows.

One row per training run: the recipe keys on which the runs differ, the best FID and the training
step it was measured at, the latest images/s, the lineage's GPU hours and its goodput (the share
of its allocated GPU time in steps that count, regscale.launch.goodput). `plot` draws FID and
the loss against training iterations, one line per run.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from regscale.errors import UserError, first_line
from regscale.fsutil import atomic_path
from regscale.metrics import EVAL_PREFIX, GOODPUT, GPU_HOURS, IMAGES_PER_S, LOSS
from regscale.track.lineage import stored_run_id

FID = EVAL_PREFIX + "fid"
FID_NOT_COMPARABLE = FID + "_not_comparable"  # smoke runs: a random Inception network (marked *)
IGNORED_PARAMS = ("run.name", "run.dir")  # the row label already says which run it is
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_WORD = re.compile(r" ?[^ ./_-]+[./_-]?| ?[./_-]")  # text breaks before a space, after . / _ -
ID_CHARS, MIN_ID_CHARS = 8, 4  # of a run id in the table: as many as there is room for
MIN_FOLDED = 8  # a long recipe value folds to no fewer characters a line


@dataclass
class RunSummary:
    """What `compare` shows of one run."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    last_step: Optional[int] = None
    best_fid: Optional[float] = None
    best_fid_step: Optional[int] = None
    images_per_s: Optional[float] = None
    gpu_hours: Optional[float] = None
    goodput: Optional[float] = None
    fid_curve: list[tuple[int, float]] = field(default_factory=list)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    loss_key: Optional[str] = None
    fid_comparable: bool = True


def _first(keys: tuple[str, ...], metrics: dict[str, float]) -> Optional[str]:
    return next((k for k in keys if k in metrics), None)


def _history(client: Any, run_id: str, key: Optional[str]) -> list[tuple[int, float]]:
    if key is None:
        return []
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def summarize(client: Any, run: Any) -> RunSummary:
    """Read one run's params, best FID (and its step), throughput, GPU hours and curves."""
    metrics = run.data.metrics
    loss_key = LOSS if LOSS in metrics else None
    fid_key = _first((FID, FID_NOT_COMPARABLE), metrics)
    fid = _history(client, run.info.run_id, fid_key)
    loss = _history(client, run.info.run_id, loss_key)
    summary = RunSummary(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                         status=run.info.status, params=dict(run.data.params), fid_curve=fid,
                         loss_curve=loss, loss_key=loss_key, fid_comparable=fid_key != FID_NOT_COMPARABLE)
    if fid:
        summary.best_fid_step, summary.best_fid = min(fid, key=lambda p: (p[1], p[0]))
    summary.images_per_s = metrics.get(IMAGES_PER_S)
    summary.gpu_hours = metrics.get(GPU_HOURS)
    summary.goodput = metrics.get(GOODPUT)
    progress = loss or _history(client, run.info.run_id, GPU_HOURS if GPU_HOURS in metrics else None)
    summary.last_step = max(s for s, _ in progress) if progress else None
    return summary


def find_runs(client: Any, refs: list[str], experiment: str, filter_string: Optional[str]) -> list[Any]:
    """The runs named by `refs` (run ids, run directories or run names), else every training run
    of `experiment` matching `filter_string` (MLflow search syntax), oldest first."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if refs:
        runs = []
        for ref in refs:
            ref = stored_run_id(Path(ref)) or ref
            if _RUN_ID.match(ref):
                try:
                    runs.append(client.get_run(ref))
                    continue
                except MlflowException:
                    pass
            found = [] if exp is None or "'" in ref else client.search_runs(  # a quote: no such name
                [exp.experiment_id], f"tags.mlflow.runName = '{ref}' and tags.`regscale.kind` = 'train'")
            if not found:
                raise UserError(f"run '{ref}': no such run id, run directory or run name in experiment "
                                f"'{experiment}'")
            runs.extend(found)
        return runs
    if exp is None:
        raise UserError(f"experiment '{experiment}' not found in the tracking store")
    query = "tags.`regscale.kind` = 'train'" + (f" and {filter_string}" if filter_string else "")
    try:
        runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"])
    except MlflowException as err:
        raise UserError(f"--filter {filter_string!r}: {first_line(err)}") from None
    if not runs:
        raise UserError(f"no training runs in experiment '{experiment}'"
                        + (f" match {filter_string!r}" if filter_string else ""))
    return runs


def differing_params(summaries: list[RunSummary]) -> list[str]:
    """Recipe keys whose values are not the same in every run, in the params' order."""
    keys: dict[str, None] = {}
    for s in summaries:
        keys.update(dict.fromkeys(s.params))
    return [k for k in keys if k not in IGNORED_PARAMS
            and len({s.params.get(k, "") for s in summaries}) > 1]


def _labels(summaries: list[RunSummary]) -> list[str]:
    names = [s.name for s in summaries]
    return [f"{s.name} ({s.run_id[:8]})" if names.count(s.name) > 1 else s.name for s in summaries]


def _fmt(value: Optional[float], digits: Optional[int], missing: str) -> str:
    """A number with `digits` decimals (None: every digit), or `missing`."""
    if value is None:
        return missing
    return repr(float(value)) if digits is None else f"{value:.{digits}f}"


def rows(summaries: list[RunSummary], exact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The comparison as a header and string rows: rounded for the terminal table; `exact` for
    the CSV (every digit, empty cells where there is no value, so spreadsheets read numbers)."""
    keys = differing_params(summaries)
    header = ["run", "run id", *keys, "status", "step", "best FID", "comparable", "at step", "images/s",
              "GPU hours", "goodput"]
    missing = "" if exact else "-"
    body = []
    for label, s in zip(_labels(summaries), summaries):
        body.append([label, s.run_id, *(s.params.get(k, "") for k in keys), s.status,
                     missing if s.last_step is None else str(s.last_step),
                     _fmt(s.best_fid, None if exact else 2, missing),
                     missing if s.best_fid is None else ("yes" if s.fid_comparable else "no"),
                     missing if s.best_fid_step is None else str(s.best_fid_step),
                     _fmt(s.images_per_s, None if exact else 1, missing),
                     _fmt(s.gpu_hours, None if exact else 2, missing),
                     _fmt(s.goodput, None, missing) if exact or s.goodput is None else f"{s.goodput:.1%}"])
    return header, body


def _fold(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters: broken after a space, '.', '/', '_' or '-'
    where it can be, inside a word where it must."""
    lines = [""]
    for token in _WORD.findall(text):
        if lines[-1] and len(lines[-1]) + len(token) > width:
            lines.append("")
            token = token.lstrip()
        lines[-1] += token
    return "\n".join(line[i:i + width] for line in lines for i in range(0, max(len(line), 1), width))


def _fit(natural: list[int], floors: list[list[int]], room: int, need: Callable[[int, int], int]) -> list[int]:
    """Column widths from `natural` down to each floor in turn until they add up to `room`: the
    column with the most to give first, one character narrower at a time (`need(i, w)`: what
    column i takes of w)."""
    widths = list(natural)
    for floor in floors:
        while sum(widths) > room:
            slack = [w - f for w, f in zip(widths, floor)]
            if max(slack) <= 0:
                break
            i = slack.index(max(slack))
            widths[i] = max(floor[i], need(i, widths[i] - 1))
    return widths


def _layout(header: list[str], cells: list[list[str]], room: int) -> tuple[list[int], int]:
    """Column widths and the gap between columns for a table `room` characters wide, where the
    cells allow. Run names, the best FID and its step stay whole; to fit, in turn: headers break
    between words, the run id shortens (to MIN_ID_CHARS), the gap closes to 1, headers break
    inside words, long recipe values fold (to MIN_FOLDED)."""
    run_id, keys = 1, range(2, header.index("status"))
    whole = {0, header.index("best FID"), header.index("at step")}
    values = [max(len(row[i]) for row in cells) for i in range(len(header))]
    natural = [max(len(name), v) for name, v in zip(header, values)]
    between_words = [max(v, *(len(word.strip()) for word in _WORD.findall(name))) for name, v in zip(header, values)]
    short_id = [MIN_ID_CHARS if i == run_id else w for i, w in enumerate(between_words)]
    inside_words = [w if i in whole else values[i] for i, w in enumerate(short_id)]
    folded = [min(w, MIN_FOLDED) if i in keys else w for i, w in enumerate(inside_words)]

    def need(i: int, w: int) -> int:  # a header folded to w may leave some of it
        return w if i == run_id else min(w, max(values[i], *map(len, _fold(header[i], w).splitlines())))

    steps = ((2, [between_words]), (2, [between_words, short_id]), (1, [between_words, short_id]),
             (1, [between_words, short_id, inside_words, folded]))
    for gap, floors in steps:
        widths = _fit(natural, floors, room - gap * (len(header) - 1), need)
        if sum(widths) + gap * (len(header) - 1) <= room:
            break
    return widths, gap


def render_table(summaries: list[RunSummary]) -> str:
    """`rows` as a text table that fits the terminal (`_layout`; whole off a terminal); a FID that
    is not comparable is marked *."""
    import shutil

    from rich import box
    from rich.console import Console
    from rich.table import Table

    header, body = rows(summaries)
    fid, comparable = header.index("best FID"), header.index("comparable")
    del header[comparable]
    cells = [[row[0], row[1][:ID_CHARS], *row[2:fid], row[fid] + ("*" if row[comparable] == "no" else ""),
              *row[comparable + 1:]] for row in body]
    widths, gap = _layout(header, cells, shutil.get_terminal_size((10**6, 24)).columns)
    table = Table(title=f"{len(summaries)} runs (recipe keys that differ; best FID at its step)",
                  caption=None if all(s.fid_comparable for s in summaries) else
                  "* a random Inception network's FID: not comparable",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, padding=(0, gap - 1))
    for i, (name, width) in enumerate(zip(header, widths)):
        table.add_column(_fold(name, width), justify="right" if i > fid - 2 else "left", width=width, no_wrap=True)
    for row in cells:
        table.add_row(row[0], row[1][:widths[1]], *(_fold(value, width) for value, width in zip(row[2:], widths[2:])))
    out = io.StringIO()
    Console(file=out, width=sum(widths) + gap * (len(header) - 1), color_system=None).print(table)
    return out.getvalue()


def write_csv(summaries: list[RunSummary], path: Path) -> None:
    """The table's rows with full run ids, every digit and comparability in its own column,
    written atomically."""
    header, body = rows(summaries, exact=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)


def plot(summaries: list[RunSummary], path: Path) -> None:
    """FID and training loss against training iterations, one line per run, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_fid, ax_loss = fig.subplots(1, 2)
    for i, (label, s) in enumerate(zip(_labels(summaries), summaries)):
        color = f"C{i % 10}"  # the same colour for a run in both panels
        if s.fid_curve:
            steps, values = zip(*s.fid_curve)
            ax_fid.plot(steps, values, marker="o", color=color, linestyle="-" if s.fid_comparable else "--",
                        label=label if s.fid_comparable else f"{label} (not comparable)")
        if s.loss_curve:
            steps, values = zip(*s.loss_curve)
            ax_loss.plot(steps, values, label=label, linewidth=1.2, color=color)
    ax_fid.set(title="FID (lower is better)", xlabel="training iteration", ylabel="FID")
    loss_keys = sorted({s.loss_key for s in summaries if s.loss_key})
    ax_loss.set(title="training loss", xlabel="training iteration", ylabel=" / ".join(loss_keys) or "loss")
    for ax, empty in ((ax_fid, "no evaluations yet"), (ax_loss, "no loss logged yet")):
        if ax.has_data():
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": PLOT_SOFTWARE})


def compare(uri: str, refs: list[str], experiment: str,
            filter_string: Optional[str] = None) -> list[RunSummary]:
    """Summaries of the selected runs in the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [summarize(client, run) for run in find_runs(client, refs, experiment, filter_string)]


PLOT_SOFTWARE = "regscale compare"  # in every plot's PNG metadata: a later --plot may replace it


def is_compare_plot(path: Path) -> bool:
    """A PNG written by `regscale compare --plot` (its metadata says so)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x89PNG") and PLOT_SOFTWARE.encode() in head


def is_compare_csv(path: Path) -> bool:
    """A CSV written by `regscale compare --csv` (its header row is ours)."""
    with open(path, newline="", errors="replace") as f:
        first = next(csv.reader(f), [])
    return first[:2] == ["run", "run id"]
