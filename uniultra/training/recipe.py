"""Pipeline recipes: a YAML file that lists the stages that make a model (``uniultra recipe run``).

Format (docs/RECIPES.md)::

    out: runs/my-model                 # root folder; a stage's folder defaults to ${out}/<stage name>
    data_root: ../shared/data          # any other top-level key is a variable for interpolation
    datasets: [busi, ddti]
    stages:                            # run in this order
      teacher:
        command: train                 # train | distill | cache-embeddings | evaluate
        config: my-model/teacher.yaml  # optional: a train/distill recipe file (relative to this file)
        options:                       # the stage's options (override the config file)
          data: ${paths:${data_root},${datasets}}
          steps: 2000
      student:
        command: distill
        options: {teacher: "${stages.teacher.out}/model.pt", data: ..., student: uniultra-student-e8}

Values are OmegaConf: ``${stages.teacher.out}`` is a stage's folder, ``${paths:ROOT,[a,b]}`` joins
a folder with names.  ``key=value`` arguments override any key (``stages.teacher.options.steps=10``).

Each stage is resumable: a finished stage (``summary.json`` with status finished, or the
stage's ``done.json`` / ``evaluation.json``) is skipped, an interrupted training stage is resumed
from its ``last.pt`` (the trainer refuses a resume state made with other settings), so running
the same command again continues where it stopped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from uniultra.errors import InputError

COMMANDS = ("train", "distill", "cache-embeddings", "evaluate")
log = logging.getLogger("uniultra")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("paths"):
        OmegaConf.register_new_resolver("paths", lambda root, names: [str(Path(root) / str(n)) for n in names])


def load(path: str | Path, overrides=()):
    """The pipeline as an OmegaConf object (stage folders filled in, not yet resolved)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.yaml"))[:4]
        raise InputError(f"recipe {path}: is a folder; give a recipe file"
                         + (f" in it ({', '.join(found)}...)" if found else ""))
    if not p.is_file():
        raise InputError(f"recipe {path}: file not found")
    try:
        cfg = OmegaConf.load(p)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise InputError(f"{bad[0]!r}: overrides are key=value (e.g. out=runs/x)")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        if not OmegaConf.is_dict(cfg) or not OmegaConf.is_dict(cfg.get("stages")):
            raise InputError(f"recipe {path}: needs a 'stages:' mapping (docs/RECIPES.md)")
        if cfg.get("out") is None:
            cfg.out = f"runs/{p.stem}"
        for name, stage in cfg.stages.items():
            if stage.get("command") not in COMMANDS:
                raise InputError(f"recipe {path}: stage {name}: command must be one of {', '.join(COMMANDS)}")
            if stage.get("out") is None:
                stage.out = "${out}/" + str(name)
            if stage.get("options") is None:
                stage.options = {}
            if stage.get("config"):
                stage.config = str((p.parent / str(stage.config)).resolve())
    except OmegaConfBaseException as e:
        raise InputError(f"recipe {path}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:  # a syntax error: where it is, in one line
        raise InputError(f"recipe {path}: not valid YAML ({_yaml_where(e)})") from None
    except UnicodeDecodeError:
        raise InputError(f"recipe {path}: not UTF-8 text; save it as UTF-8") from None
    return cfg


def _yaml_where(e) -> str:
    """``line L, column C: problem`` of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _resolved(node) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise InputError(f"recipe: {str(e).splitlines()[0]}") from None


def stage_state(stage: dict) -> str:
    """``done``, ``interrupted`` (resumable) or ``new``."""
    out = Path(stage["out"])
    if stage["command"] in ("train", "distill"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads((out / "summary.json").read_text()).get("status") in ("finished", "early-stopped"):
                return "done"
        return "interrupted" if (out / "last.pt").is_file() else "new"
    marker = "evaluation.json" if stage["command"] == "evaluate" else "done.json"
    return "done" if (out / marker).is_file() else ("interrupted" if out.is_dir() else "new")


def show(path, overrides=()) -> str:
    from omegaconf import OmegaConf

    cfg = load(path, overrides)
    text = OmegaConf.to_yaml(OmegaConf.create(_resolved(cfg)))
    states = [f"# {name}: {stage_state(_resolved(st))} ({_resolved(st)['out']})" for name, st in cfg.stages.items()]
    return text + "\n".join(states)


def run(path, overrides=(), only=None, progress=None, cancel=None) -> dict:
    """Run the stages in order; returns ``{"status", "stages": {name: {"state", "out", ...}}}``."""
    cfg = load(path, overrides)
    names = list(cfg.stages.keys())
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise InputError(f"--only {unknown[0]}: no such stage (stages: {', '.join(names)})")
    result = {"recipe": str(path), "status": "finished", "stages": {}}
    for name in names:
        if only and name not in only:
            continue
        stage = _resolved(cfg.stages[name])
        state = stage_state(stage)
        entry = result["stages"][name] = {"command": stage["command"], "out": stage["out"], "state": state}
        if state == "done":
            log.info("stage %s: done before (%s), skipped", name, stage["out"])
            continue
        log.info("stage %s: %s %s (%s)", name, "resuming" if state == "interrupted" else "running",
                 stage["command"], stage["out"])
        status = _run_stage(stage, state == "interrupted", progress, cancel)
        entry["status"] = status
        if status not in ("finished", "early-stopped"):
            result["status"] = status
            log.info("stage %s %s: run the same command again to continue", name, status)
            break
    return result


def _run_stage(stage: dict, resume: bool, progress, cancel) -> str:
    cmd, out, opts = stage["command"], Path(stage["out"]), dict(stage.get("options") or {})
    if cmd in ("train", "distill"):
        from uniultra.training.config import DistillConfig, TrainConfig, load_config

        cls = TrainConfig if cmd == "train" else DistillConfig
        opts.update(out=str(out), resume=resume)
        cfg = load_config(cls, stage.get("config"), opts)
        if cmd == "train":
            from uniultra.training.trainer import train

            return train(cfg, progress, cancel)["status"]
        from uniultra.training.distill import distill

        return distill(cfg, progress, cancel)["status"]
    out.mkdir(parents=True, exist_ok=True)
    if cmd == "cache-embeddings":
        opts.setdefault("cache", str(out))
        _cli([cmd], opts)
        (out / "done.json").write_text(json.dumps({"options": opts}, indent=2))
        return "finished"
    # evaluate: one run per data folder, merged into evaluation.json
    merged: dict = {"datasets": {}}
    data = opts.pop("data")
    for d in ([data] if isinstance(data, str) else data):
        res = json.loads(_cli([cmd, "--json"], {**opts, "data": d}))
        merged["datasets"].update(res.get("datasets", {}))
        merged.update({k: v for k, v in res.items() if k != "datasets"})
    (out / "evaluation.json").write_text(json.dumps(merged, indent=2))
    return "finished"


def _cli(head: list[str], opts: dict) -> str:
    """Run a `uniultra` subcommand in this process with ``opts`` as its options; returns its stdout."""
    from uniultra.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    known = sub.choices[head[0]]._option_string_actions
    argv = list(head)
    for k, v in opts.items():
        flag = "--" + str(k).replace("_", "-")
        if v is None or (v is False and f"--no-{flag[2:]}" not in known):
            continue
        if isinstance(v, bool):
            argv.append(flag if v else f"--no-{flag[2:]}")
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    args = parser.parse_args(argv)
    if getattr(args, "model", "x") is None:
        from uniultra.inference import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = args.func(args)
    if rc:
        raise InputError(f"stage `uniultra {' '.join(argv[:1])}` failed (exit status {rc})")
    return buf.getvalue()
