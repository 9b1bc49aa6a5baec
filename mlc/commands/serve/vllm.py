"""`mlc serve --engine vllm`: hand an mlc artifact to vLLM's OpenAI server (`vllm serve`), keeping mlc's run record.

vLLM runs the model (GPUs, tensor parallelism, its own kernels); mlc resolves MODEL (a directory or a
run reference), checks that vLLM can open it, translates the serve options it has an equivalent for,
records the run (inputs with hashes and their producing runs, so lineage works as with mlc's engine),
and supervises the `vllm` process: SIGTERM/Ctrl-C is forwarded, and after --grace-period (+5 s) a
vLLM that has not stopped is killed. Options without a vLLM equivalent are refused, never ignored.

What vLLM opens: HF directories, compressed-tensors and bitsandbytes quantisations (their
quantization_config names the method, and vLLM detects it), and PEFT LoRA adapters (`--lora
NAME=PATH`, or MODEL itself an adapter directory: its base model is served with the adapter under
the served model name). mlc's own quantisation layout (no quant_method) is refused here with a hint,
as vLLM would refuse it. The API key goes to vLLM through its VLLM_API_KEY variable, not argv (argv
is visible to every user of the machine in `ps`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlc.errors import InputError, MlcError, MlcUsageError

# vLLM's --max-lora-rank accepts these values only (its EngineArgs choices); an adapter's rank is rounded up.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Methods in a quantization_config that vLLM reads from the directory itself.
VLLM_QUANT_METHODS = ("compressed-tensors", "bitsandbytes")
# After the grace period, vLLM gets this long to exit on its own before it is killed.
KILL_AFTER_S = 5.0


@dataclass
class VllmOptions:
    """What `mlc serve` passes on to vLLM: the ServeConfig fields with an equivalent, plus vLLM-only ones."""

    host: str
    port: int
    served_model_name: str | None
    dtype: str
    max_model_len: int | None
    api_key: str | None
    grace_period: float
    block_size: int | None = None  # None: vLLM's default (the option was not given)
    max_batched_tokens: int | None = None
    max_running: int | None = None
    kv_cache_bytes: int | None = None
    prefix_caching: bool | None = None
    enforce_eager: bool = False
    loras: list[str] = field(default_factory=list)  # NAME=PATH or NAME=run reference
    extra: list[str] = field(default_factory=list)  # --vllm-arg values, verbatim


def options_from_cli(params: dict[str, Any], given: Callable[[str], bool]) -> VllmOptions:
    """VllmOptions from `mlc serve`'s parameters; given(name) says whether the user set that option.

    Options left at mlc's defaults are not passed (vLLM keeps its own defaults); a given option with no
    vLLM equivalent is a usage error.
    """
    from mlc.commands.serve.server import parse_memory

    for name, flag in (("threads", "--threads"), ("max_queue", "--max-queue")):
        if given(name):
            raise MlcUsageError(f"{flag} has no vLLM equivalent", f"leave out {flag} with --engine vllm (or pass vLLM's own options with --vllm-arg)")
    if params["dtype"] not in ("auto", "float32", "bfloat16"):
        raise MlcUsageError(f"--dtype {params['dtype']!r} is not auto, float32 or bfloat16", "choose one of them")
    kv_bytes = None
    if given("kv_cache_memory"):
        kv_bytes = parse_memory(params["kv_cache_memory"], available=0)
        if kv_bytes == 0:  # a fraction: of this machine's free RAM for mlc, a meaningless figure for vLLM's GPU cache
            raise MlcUsageError(f"--kv-cache-memory {params['kv_cache_memory']} is a fraction of free RAM, which vLLM has no use for",
                                "give a size (8GiB), or pass vLLM's --gpu-memory-utilization with --vllm-arg")

    def if_given(name: str) -> Any:
        return params[name] if given(name) else None

    return VllmOptions(
        host=params["host"], port=params["port"], served_model_name=params["served_model_name"], dtype=params["dtype"],
        max_model_len=params["max_model_len"], api_key=params["api_key"], grace_period=params["grace_period"],
        block_size=if_given("block_size"), max_batched_tokens=if_given("max_batched_tokens"), max_running=if_given("max_running"),
        kv_cache_bytes=kv_bytes, prefix_caching=if_given("prefix_caching"), enforce_eager=given("compile") and not params["compile"],
        loras=list(params["lora"] or []), extra=list(params["vllm_arg"] or []),
    )


def find_vllm() -> str:
    """The `vllm` executable on PATH; MlcError with an install hint when vLLM is not installed."""
    exe = shutil.which("vllm")
    if exe is None:
        raise MlcError("--engine vllm needs vLLM, which is not installed (no `vllm` on PATH)",
                       "pip install vllm on a machine it supports (a CUDA GPU), or leave out --engine to serve with mlc's engine")
    return exe


def check_model_dir(path: Path) -> None:
    """Raise InputError unless vLLM can open the model directory at path (config.json, safetensors, a known layout)."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise InputError(f"{path} is not a model directory (no config.json)", "give an HF model directory or an mlc run reference")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_file} is not JSON ({e})", "repair or re-create the model directory") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_file} is not a JSON object", "repair or re-create the model directory")
    if not any(path.glob("*.safetensors")):
        raise InputError(f"{path} has no .safetensors weights", "convert the checkpoint with `mlc checkpoint convert`")
    qconfig = config.get("quantization_config")
    if isinstance(qconfig, dict) and qconfig.get("quant_method") not in VLLM_QUANT_METHODS:
        raise InputError(
            f"{path} uses mlc's own quantisation layout ({qconfig.get('quant_method') or 'no quant_method'}), which vLLM cannot load",
            "serve it with mlc's engine (leave out --engine), or quantize with a compressed-tensors scheme (int4, int8, fp8) for vLLM",
        )


def adapter_rank(path: Path) -> int:
    """The LoRA rank of the PEFT adapter at path (its largest, with per-module ranks); InputError if it is not one."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise InputError(f"{path} is not a LoRA adapter (no adapter_config.json)", "give a PEFT adapter directory (mlc train with LoRA writes one)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_file} is not JSON ({e})", "repair or re-create the adapter") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{path} is not a LoRA adapter (peft_type {config.get('peft_type') if isinstance(config, dict) else None})",
                         "vLLM serves LoRA adapters only")
    if not (path / "adapter_model.safetensors").is_file():
        raise InputError(f"{path} has no adapter_model.safetensors", "vLLM loads adapters saved as safetensors")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise InputError(f"{config_file}: the rank r is not a positive integer", "repair the adapter's config")
    return max(ranks)


def lora_rank_choice(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    for choice in LORA_RANKS:
        if choice >= rank:
            return choice
    raise InputError(f"a LoRA rank of {rank} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})", "merge the adapter into the model first (mlc merge)")


def split_lora(text: str) -> tuple[str, str]:
    """(name, path or reference) of a --lora NAME=PATH value."""
    name, sep, ref = text.partition("=")
    if not sep or not name.strip() or not ref.strip():
        raise MlcUsageError(f"--lora {text!r} is not NAME=PATH", "for example --lora sql=runs/.../artifacts/adapter or --lora sql=latest:train")
    return name.strip(), ref.strip()


def vllm_argv(exe: str, model: Path, name: str, opts: VllmOptions, loras: dict[str, Path]) -> list[str]:
    """The `vllm serve` command line: MODEL, then each option mlc translates, then --vllm-arg values verbatim."""
    argv = [exe, "serve", str(model), "--host", opts.host, "--port", str(opts.port), "--served-model-name", name]
    if opts.dtype != "auto":
        argv += ["--dtype", opts.dtype]  # vLLM's names: auto, float32, bfloat16 (and others mlc has no use for)
    if opts.max_model_len is not None:
        argv += ["--max-model-len", str(opts.max_model_len)]
    for flag, value in (("--block-size", opts.block_size), ("--max-num-batched-tokens", opts.max_batched_tokens),
                        ("--max-num-seqs", opts.max_running), ("--kv-cache-memory-bytes", opts.kv_cache_bytes)):
        if value is not None:
            argv += [flag, str(value)]
    if opts.prefix_caching is not None:
        argv.append("--enable-prefix-caching" if opts.prefix_caching else "--no-enable-prefix-caching")
    if opts.enforce_eager:
        argv.append("--enforce-eager")
    if loras:
        rank = lora_rank_choice(max(adapter_rank(p) for p in loras.values()))
        argv += ["--enable-lora", "--max-loras", str(len(loras)), "--max-lora-rank", str(rank), "--lora-modules"]
        argv += [f"{n}={p}" for n, p in loras.items()]
    return argv + opts.extra


def serve_vllm(model_ref: str, opts: VllmOptions) -> int:
    """Run `vllm serve` on the resolved artifact until it exits or SIGTERM/Ctrl-C stops it; returns vLLM's exit code."""
    from mlc import console
    from mlc.runs import open_run

    exe = find_vllm()  # before the run: a missing vLLM is a usage problem, not a failed serve
    record = {"engine": "vllm", "model": model_ref, **{k: v for k, v in vars(opts).items() if k != "api_key"},
              "api_key": "set" if opts.api_key else None}
    with open_run("serve", record, handle_sigterm=False) as run:
        path = run.add_input(model_ref, role="model")
        loras: dict[str, Path] = {}
        is_ref = model_ref.startswith(("run:", "latest:"))
        name = opts.served_model_name or (model_ref if is_ref else path.resolve().name)
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            base = _adapter_base(path)  # MODEL is an adapter: serve its base, with the adapter under the served name
            loras[name] = path
            path = run.add_input(str(base), role="base_model")
            name_base = path.resolve().name
        else:
            name_base = name
        check_model_dir(path)
        for text in opts.loras:
            lora_name, ref = split_lora(text)
            if lora_name in loras or lora_name == name_base:
                raise MlcUsageError(f"--lora name {lora_name!r} is used twice", "give each adapter its own name")
            loras[lora_name] = run.add_input(ref, role="adapter")
        argv = vllm_argv(exe, path, name_base, opts, loras)
        env = dict(os.environ)
        if opts.api_key:
            env["VLLM_API_KEY"] = opts.api_key
        proc = subprocess.Popen(argv, env=env)
        run.set_summary(engine="vllm", vllm_pid=proc.pid, vllm_argv=argv[1:], served_models=[name_base, *loras])
        run.log(f"vllm pid {proc.pid}: {' '.join(argv)}")
        console.info(f"serving {path} with vLLM on http://{opts.host}:{opts.port}/v1 (pid {proc.pid})")
        code, stopped = _supervise(proc, opts.grace_period)
        run.set_summary(vllm_exit_code=code)
        if code != 0 and not stopped:
            raise MlcError(f"vLLM exited with code {code}", "its output is above; the command line is in the run record (mlc runs show latest:serve)")
        return code


def _adapter_base(path: Path) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise InputError(f"{path} is a LoRA adapter whose base model ({base!r}) is not a local directory",
                         "serve the base model and give the adapter with --lora NAME=PATH")
    return Path(base)


def _supervise(proc: subprocess.Popen, grace_period: float) -> tuple[int, bool]:
    """(vLLM's exit code, whether mlc stopped it): forward the first SIGTERM/SIGINT, kill after the grace period."""
    asked: list[float] = []

    def forward(signum: int, frame: Any) -> None:
        if not asked:
            asked.append(time.monotonic())
            proc.send_signal(signal.SIGTERM)  # vLLM's own shutdown: it stops its engine and uvicorn
        else:
            proc.kill()  # a second signal stops at once, as with mlc's engine

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.5), bool(asked)
            except subprocess.TimeoutExpired:
                if asked and time.monotonic() - asked[0] > grace_period + KILL_AFTER_S:
                    proc.kill()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
