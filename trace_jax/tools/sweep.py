"""`python -m trace_jax.tools.sweep --sweep=configs/sweeps/NAME.py --config=configs/demo.py[:ARGS]
--workdir=runs/sweeps/NAME [--dry_run] [--extra=--config.total_steps=20]`: runs a sweep.

Each variant of the sweep file (`get_sweep() -> list[dict]`, see configs/sweeps/__init__.py) is
one `python -m trace_jax.main` subprocess, one after the other, in WORKDIR/<variant name>, with the
`--extra` flags and then the variant's overrides as `--config.<key>=<value>` flags. Every variant is
checked against the config before the first one starts, so a typo'd key fails in seconds. A
variant whose metrics.jsonl already holds the final step is skipped, so rerunning the command
resumes the sweep (and an interrupted variant resumes from its checkpoint). The final logged
metrics of every variant go to WORKDIR/summary.md (also printed) and WORKDIR/summary.json. A failed
variant does not stop the others; the command exits 1 afterwards and names it.

This tool trains nothing itself and knows nothing of pods: on a pod the same command runs on
every worker (each variant's main joins the run), with WORKDIR on storage all workers share.
Plots: `python -m trace_jax.tools.plot --workdir=WORKDIR`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

from trace_jax.train import curves

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Columns of summary.md after the variant's overrides (summary.json keeps the whole final row).
SUMMARY_METRICS = ("loss/total", "loss/lm", "loss/contrastive", "contrastive/top1",
                   "route/reason_frac")


def load_sweep(path: str) -> list[dict]:
  """The variants of a sweep file, validated: a non-empty list of dicts, each with a unique
  folder-safe `name` and at least one dotted override key.

  Raises:
    FileNotFoundError, or ValueError saying which variant is malformed.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no sweep file at {path}")
  spec = importlib.util.spec_from_file_location(
    f"_sweep_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep()")
  variants = module.get_sweep()
  if not isinstance(variants, list) or not variants:
    raise ValueError(f"{path}: get_sweep() must return a non-empty list of dicts")
  seen = set()
  for i, v in enumerate(variants):
    if not isinstance(v, dict):
      raise ValueError(f"{path}: variant {i} is a {type(v).__name__}, not a dict")
    name = v.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
      raise ValueError(f"{path}: variant {i} needs a 'name' of letters, digits, '.', '_', '-'; "
                       f"got {name!r}")
    if name in seen:
      raise ValueError(f"{path}: variant name {name!r} repeats")
    seen.add(name)
    keys = [k for k in v if k != "name"]
    if not keys:
      raise ValueError(f"{path}: variant {name!r} overrides nothing")
    for k in keys:
      if not isinstance(k, str) or not k or k.startswith(("-", ".")) or " " in k:
        raise ValueError(f"{path}: variant {name!r} has a bad key {k!r}; expected e.g. "
                         "'loss.lambda_gen'")
  return [dict(v) for v in variants]


def overrides_of(variant: dict) -> dict:
  return {k: v for k, v in variant.items() if k != "name"}


def flag_value(value) -> str:
  """How ml_collections' config flags parse a value back: strings raw, others as literals."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def override_flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]


def split_extra(extra: list[str]) -> list[str]:
  return [tok for item in extra for tok in shlex.split(item)]


def config_keys_set(flag_list: list[str]) -> set[str]:
  """Dotted config keys that `--config.KEY=...` flags in `flag_list` set."""
  out = set()
  for f in flag_list:
    m = re.match(r"^--config\.([^=]+)", f)
    if m:
      out.add(m.group(1))
  return out


def resolve_config(config_spec: str, flag_list: list[str]):
  """The config `trace_jax.main --config=config_spec *flag_list` would train (only the
  `--config.*` flags of `flag_list` matter). Unknown keys and values of the wrong type raise."""
  config_flag_list = [f for f in flag_list if f.startswith("--config.")]
  argv = ["sweep", f"--config={config_spec}", *config_flag_list]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].", flag_values=fv,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def command(config_spec: str, workdir: str, extra: list[str], overrides: dict) -> list[str]:
  """The `trace_jax.main` command line of one variant; its overrides come last."""
  return [sys.executable, "-m", "trace_jax.main", f"--config={config_spec}",
          f"--workdir={workdir}", *extra, *override_flags(overrides)]


def is_finished(workdir: str, total_steps: int) -> bool:
  """Whether the run in `workdir` logged its final step (the loop always logs it)."""
  row = curves.final_row(workdir)
  return row is not None and int(row["step"]) >= total_steps


def run_logged(cmd: list[str], log_path: str) -> int:
  """Runs `cmd`, streaming its output to stdout and appending it to `log_path`; its exit code."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  with open(log_path, "a") as log:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, errors="replace")
    for line in proc.stdout:
      sys.stdout.write(line)
      log.write(line)
    sys.stdout.flush()
    return proc.wait()


def _fmt(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def summary_markdown(results: list[dict]) -> str:
  """One markdown table: variant, status, final step, the overridden keys, SUMMARY_METRICS."""
  keys = []
  for r in results:
    keys += [k for k in r["overrides"] if k not in keys]
  header = ["variant", "status", "step", *keys, *SUMMARY_METRICS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    final = r["final"] or {}
    cells = [r["name"], r["status"], _fmt(final.get("step")),
             *(_fmt(r["overrides"].get(k)) for k in keys),
             *(_fmt(final.get(m)) for m in SUMMARY_METRICS)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_sweep(sweep_path: str, config_spec: str, workdir: str, extra: list[str],
              dry_run: bool = False) -> list[dict]:
  """Runs (or, dry, prints) every variant; writes and prints the summary.

  Returns:
    one dict per variant: name, overrides, workdir, command, status (finished = skipped as already
    done, ran, failed, or dry_run), returncode, final (the last logged metrics row or None).
  """
  variants = load_sweep(sweep_path)
  extra = split_extra(extra)
  for v in variants:
    clash = config_keys_set(extra) & set(overrides_of(v))
    if clash:
      raise ValueError(f"--extra sets {sorted(clash)}, which variant {v['name']!r} sweeps")
  # Check every variant against the config before training anything.
  total_steps = {}
  for v in variants:
    try:
      config = resolve_config(config_spec, extra + override_flags(overrides_of(v)))
    except Exception as e:  # noqa: BLE001  (flags raise several types; name the variant)
      raise ValueError(f"variant {v['name']!r} of {sweep_path} does not apply to {config_spec}: "
                       f"{e}") from e
    total_steps[v["name"]] = int(config.total_steps)

  results = []
  for v in variants:
    name, ov = v["name"], overrides_of(v)
    vdir = os.path.join(workdir, name)
    cmd = command(config_spec, vdir, extra, ov)
    result = dict(name=name, overrides=ov, workdir=vdir, command=shlex.join(cmd),
                  total_steps=total_steps[name], returncode=None)
    if is_finished(vdir, total_steps[name]):
      result["status"] = "finished"
      print(f"# {name}: finished ({total_steps[name]} steps), skipped", flush=True)
    elif dry_run:
      result["status"] = "dry_run"
      print(shlex.join(cmd), flush=True)
    else:
      os.makedirs(vdir, exist_ok=True)
      print(f"# {name}: {shlex.join(cmd)}", flush=True)
      rc = run_logged(cmd, os.path.join(vdir, "train.log"))
      result["returncode"] = rc
      result["status"] = "ran" if rc == 0 and is_finished(vdir, total_steps[name]) else "failed"
    result["final"] = curves.final_row(vdir)
    results.append(result)
  if dry_run:
    return results

  table = summary_markdown(results)
  print(table, end="", flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(f"# Sweep `{sweep_path}` on `{config_spec}`\n\n")
    if extra:
      f.write(f"Extra flags: `{shlex.join(extra)}`\n\n")
    f.write(table)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(dict(sweep=sweep_path, config=config_spec, extra=extra, variants=results), f,
              indent=2)
  return results


def _define_flags() -> None:
  """Defined when run as a command only, so tests can import this module next to others that
  define `--config` and `--workdir` on the global flags."""
  flags.DEFINE_string("sweep", None, "A configs/sweeps/*.py file.")
  flags.DEFINE_string("config", None, "The base config file[:args], as trace_jax.main takes it.")
  flags.DEFINE_string("workdir", None, "Sweep folder; variant V trains in WORKDIR/V.")
  flags.DEFINE_bool("dry_run", False, "Print the commands and run nothing.")
  flags.DEFINE_multi_string(
    "extra", [], "Flags for every variant's trace_jax.main (shell-split; may repeat), e.g. "
    "--extra='--config.total_steps=20 --config.log.every_steps=5'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass trace_jax.main flags via --extra")
  f = flags.FLAGS
  results = run_sweep(f.sweep, f.config, f.workdir, f.extra, f.dry_run)
  failed = [r for r in results if r["status"] == "failed"]
  if failed:
    for r in failed:
      print(f"FAILED: variant {r['name']} (exit code {r['returncode']}); log at "
            f"{os.path.join(r['workdir'], 'train.log')}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["sweep", "config", "workdir"])
  app.run(main)
