"""What a run shows and records as it goes: the progress line, metrics.jsonl (one JSON row
per step) and loss.svg (the loss curve, drawn without a plotting dependency)."""
import json
import os
import sys

from .checkpoints import RunFileError
from .fileio import named, write_atomic

__all__ = ["Progress", "MetricsLog", "read_metrics", "write_loss_svg", "try_write_loss_svg"]


# -- the progress line -----------------------------------------------------------------------
def _fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One live line on a terminal; plain log lines otherwise."""

    def __init__(self, total, stream=None, log_every=1):
        self.total, self.stream, self.log_every = total, stream or sys.stderr, log_every
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step, loss, lr, tok_s, eta, val_loss=None):
        text = f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:.0f} tok/s | ETA {_fmt_time(eta)}"
        if val_loss is not None:
            text += f" | val_loss {val_loss:.4f}"
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if step == self.total or val_loss is not None else ""))
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total or val_loss is not None:
            print(text, file=self.stream, flush=True)

    def message(self, text):
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)


# -- metrics.jsonl ---------------------------------------------------------------------------------
def read_metrics(path, start, warn):
    """The rows of steps 1..start from metrics.jsonl. A torn last line (a kill while the row was
    written: no newline, not JSON) is dropped with warn(message); any other damage is a
    RunFileError naming the file and line."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing (the rows of steps 1..{start}, which the checkpoint continues)") \
            from None
    lines = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines)  # the text after the last newline
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            if torn:
                warn(f"lora-np train: warning: {path}:{number}: dropped a torn last line (a run was stopped while "
                     f"writing it)")
                continue
            raise RunFileError(f"{path}:{number}: not a JSON row: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or \
                not all(isinstance(row.get(k, 0.0), (int, float)) for k in ("loss", "val_loss", "elapsed")):
            raise RunFileError(f"{path}:{number}: expected a JSON object with an integer 'step' and numbers "
                               f"for 'loss', 'val_loss' and 'elapsed'")
        rows.append(row)
    rows = [r for r in rows if r["step"] <= start]
    if [r["step"] for r in rows] != list(range(1, start + 1)):
        raise RunFileError(f"{path}: expected one row for each of steps 1..{start} (the checkpoint's step), "
                           f"found steps {[r['step'] for r in rows][:20]}")
    return rows


class MetricsLog:
    """metrics.jsonl, written as the run goes: first the rows a resumed run keeps (atomically),
    then one row appended and flushed at the end of each step. `rows` holds every row;
    path None writes nothing (the ranks other than 0)."""

    def __init__(self, path, rows=()):
        self.path, self.rows = path, list(rows)
        if path:
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        self._file = open(path or os.devnull, "a")

    def append(self, row):
        self.rows.append(row)
        with named(self.path or os.devnull):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


# -- the loss picture ----------------------------------------------------------------------------
def write_loss_svg(rows, path, width=640, height=320):
    """A loss curve as SVG (no plotting dependency): train loss per step, val loss as dots."""
    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val_pts = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    pts = train_pts + val_pts
    if not pts:
        return
    pad = 48
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in train_pts)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#d62728"/>' for x, y in val_pts)
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>
<text x="{pad}" y="{height - pad + 16}">{x0}</text><text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">{x1}</text>
<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{y0:.3f}</text><text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.3f}</text>
<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step</text>
<text x="{width / 2}" y="20" text-anchor="middle">loss (line: train, dots: validation)</text>
<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
{dots}
</svg>
"""
    write_atomic(path, svg.encode())


def try_write_loss_svg(rows, out, progress):
    """loss.svg is an extra: failing to write it is a warning, never the end of a run."""
    path = os.path.join(out, "loss.svg")
    try:
        write_loss_svg(rows, path)
    except OSError as e:
        progress.message(f"lora-np train: warning: could not write {e.filename or path}: {e.strerror or e}")
