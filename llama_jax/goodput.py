"""Goodput: where a run's wall time went, summed over every session of one workdir.

Each session times its parts; WORKDIR/goodput.json holds one entry per session (rewritten at
least every few seconds, so a killed session loses little). A resumed session charges the
steps its predecessor computed past the restored checkpoint to restart_lost (they are computed
again), and a spike rewind charges the discarded steps to rewound; both come out of productive.
"""

import json
import os
import pathlib
import time

PARTS = ("productive", "compile", "startup", "data_wait", "evaluation", "checkpoint_save",
         "checkpoint_restore", "rewound", "restart_lost")
WRITE_EVERY_S = 2.0


class Goodput:
    def __init__(self, workdir, enabled=True, start=None):
        self.path = pathlib.Path(workdir) / "goodput.json"
        self.enabled = enabled
        self.start = time.time() if start is None else start
        self.sessions = read_sessions(self.path) if self.path.exists() else []
        self.session = {"parts": dict.fromkeys(PARTS, 0.0), "steps_computed": 0,
                        "last_step": None, "lost_steps": 0, "rewound_steps": 0}
        self.sessions.append(self.session)
        self.written = 0.0

    def add(self, part, seconds):
        self.session["parts"][part] += seconds

    def session_seconds(self):
        """This session's wall time accounted so far (restart_lost is an earlier session's)."""
        return sum(v for p, v in self.session["parts"].items() if p != "restart_lost")

    def timed(self, part):
        return _Timer(self, part)

    def resumed(self, step):
        """Charges the previous session's steps past `step` (computed again now) as lost."""
        if len(self.sessions) < 2 or self.sessions[-2]["last_step"] is None:
            return
        previous = self.sessions[-2]
        lost = max(previous["last_step"] - step, 0)
        per_step = previous["parts"]["productive"] / max(previous["steps_computed"], 1)
        self.session["lost_steps"] = lost
        self.add("restart_lost", lost * per_step)  # moved out of productive in totals()

    def step_done(self, step, seconds, flush=False):
        """Step `step` took `seconds`; the ledger is rewritten when flush (a log step) or
        every WRITE_EVERY_S, so a killed session's last steps are known to its successor."""
        self.session["steps_computed"] += 1
        self.session["last_step"] = step
        self.add("productive", seconds)
        if flush or time.time() - self.written > WRITE_EVERY_S:
            self.write()

    def rewound(self, steps, seconds):
        """`steps` computed steps, taking `seconds`, were thrown away by a rewind."""
        self.session["rewound_steps"] += steps
        self.add("rewound", seconds)
        self.add("productive", -seconds)

    def write(self):
        self.session["wall_s"] = time.time() - self.start
        self.written = time.time()
        if self.enabled:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"sessions": self.sessions}, indent=1))
            os.replace(tmp, self.path)

    def totals(self):
        self.session["wall_s"] = time.time() - self.start
        return totals(self.sessions)


def totals(sessions):
    """Seconds per part over all sessions, the wall time, the unaccounted rest, goodput."""
    parts = {p: sum(s["parts"][p] for s in sessions) for p in PARTS}
    parts["productive"] -= parts["restart_lost"]  # those steps were done again later
    wall = sum(s.get("wall_s", 0.0) for s in sessions)
    return {**{f"{p}_s": v for p, v in parts.items()}, "wall_s": wall,
            "unaccounted_s": wall - sum(parts.values()), "sessions": len(sessions),
            "lost_steps": sum(s["lost_steps"] for s in sessions),
            "rewound_steps": sum(s["rewound_steps"] for s in sessions),
            "goodput": parts["productive"] / wall if wall else 0.0}


class _Timer:
    def __init__(self, goodput, part):
        self.goodput, self.part = goodput, part

    def __enter__(self):
        self.begin = time.time()

    def __exit__(self, *_):
        self.goodput.add(self.part, time.time() - self.begin)


def describe(totals):
    """'goodput 81% of 300 s: productive 243 s, compile 12 s, ...' (parts over 0.5 s)."""
    parts = ", ".join(f"{p.replace('_', ' ')} {totals[p + '_s']:.0f} s" for p in PARTS
                      if totals[p + "_s"] >= 0.5)
    lost = (f"; {totals['lost_steps']} steps recomputed after restarts"
            if totals["lost_steps"] else "")
    return (f"goodput {100 * totals['goodput']:.0f}% of {totals['wall_s']:.0f} s over "
            f"{totals['sessions']} session(s): {parts}{lost}")


def read(workdir):
    """The totals of a workdir's goodput.json (for plot)."""
    path = pathlib.Path(workdir) / "goodput.json"
    if not path.is_file():
        raise FileNotFoundError(f"--workdir={workdir} has no goodput.json: pass the workdir of "
                                "a llama_jax.train run")
    return totals(read_sessions(path))


def read_sessions(path):
    """The sessions of a goodput.json; a damaged one is a one-line error naming it."""
    try:
        sessions = json.loads(path.read_text())["sessions"]
        for s in sessions:  # every key that resumed() and totals() read
            [float(s[k]) for k in ("steps_computed", "lost_steps", "rewound_steps")]
            [float(s["parts"][p]) for p in PARTS]
            if s["last_step"] is not None:
                int(s["last_step"])
        return sessions
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not the layout write() writes
        problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
        raise ValueError(f"{path} is damaged ({problem}): delete it to go on; only the time "
                         "accounting of earlier sessions is lost (no training state is in "
                         "it)") from None
