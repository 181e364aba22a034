"""Every data file the pipeline reads: where it lives under the data root, where it comes from, and its digest.

`resolve_data_file(data_root, name)` returns the file's path after checking its sha256 (once per process); a
missing file is downloaded from its URL (atomically, with a progress bar) or built from the file it derives
from, and otherwise fails with one line that names the file, the URL and the fix. Digests were computed from the
copies in /work/shared/data; `None` marks files we have never seen (their record counts are unknown too).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from nlsflow.errors import NlsflowError

log = logging.getLogger(__name__)

Role = Literal["test", "train", "calibration", "perplexity", "raw"]
DOWNLOAD_TIMEOUT_S = 30.0  # connect and per-read timeout of a download

_LLM_ADAPTERS = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main"
_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
# WikiText-2 (the tokenized v1 text, with <unk>) as pytorch/examples ships it: byte-identical to our copies.
_WIKITEXT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
_C4_SHARD = "en/c4-train.00000-of-01024.json.gz"


class MissingDataError(NlsflowError, FileNotFoundError):
    """A registered file is absent and could not be downloaded or built; the message says how to provide it."""


class DataIntegrityError(NlsflowError, ValueError):
    """A file's sha256 or record count is not the registered one."""


@dataclass(frozen=True)
class DataFile:
    """One registered file. `source`: the EVAL_DATASETS name whose scoring fits its records (None: mixed, inferred
    per record, or not scored); `derived_from`/`build`: a file built locally from another registered file."""

    name: str
    path: str  # relative to the data root
    role: Role
    url: str | None
    sha256: str | None
    records: int | None = None
    source: str | None = None
    derived_from: str | None = None
    build: Callable[[Path], bytes] | None = None


def gsm8k_to_llm_adapters(raw: dict) -> dict:
    """A GSM8K record (`question`, `answer` ending "#### N") in the LLM-Adapters format: calculator annotations
    <<...>> removed, "#### N" replaced by " The answer is N." with the thousands separators dropped."""
    solution, _, answer = raw["answer"].rpartition("\n#### ")
    answer = answer.strip().replace(",", "")
    solution = re.sub(r"<<[^>]*>>", "", solution)
    return {
        "instruction": raw["question"],
        "input": "",
        "output": f"{solution} The answer is {answer}.",
        "answer": answer,
    }


def _build_gsm8k_train(source: Path) -> bytes:
    """gsm8k_train_llm_adapters_format.json byte for byte: `json.dumps(records, indent=1)`, ASCII-escaped."""
    return json.dumps([gsm8k_to_llm_adapters(r) for r in read_records(source)], indent=1).encode()


def _test(
    name: str,
    sha256: str | None,
    records: int | None,
    *,
    path: str | None = None,
    url: str | None = "",
    source: str | None = "",
) -> DataFile:
    relpath = path or f"llm-adapters/dataset/{name}/test.json"
    return DataFile(
        f"{name}_test",
        relpath,
        "test",
        f"{_LLM_ADAPTERS}/dataset/{name}/test.json" if url == "" else url,
        sha256,
        records,
        name if source == "" else source,
    )


def _train(name: str, sha256: str, records: int) -> DataFile:
    return DataFile(
        f"{name}_train",
        f"llm-adapters/dataset/{name}/train.json",
        "train",
        f"{_LLM_ADAPTERS}/dataset/{name}/train.json",
        sha256,
        records,
        name,
    )


def _ft_training_set(name: str) -> DataFile:  # mixed tasks: `source` is inferred per record
    return DataFile(
        name, f"llm-adapters/ft-training_set/{name}.json", "train", f"{_LLM_ADAPTERS}/ft-training_set/{name}.json", None
    )


DATA_FILES: dict[str, DataFile] = {
    f.name: f
    for f in (
        # LLM-Adapters test sets, one per EVAL_DATASETS name (`<name>_test`), plus MathQA.
        _test("gsm8k", "2cc616a1e0b23ea1df29370476365cde71c4e0aa823fb06cc194c5a8a9381abe", 1319),
        _test("AQuA", "de677f5f0139340009eb01f17c0db781b4161912cd1f4efa77292f2fcf3478ee", 254),
        _test("mawps", "c1a708979cbf2b3df9ac4020baacf3e8e73fcf089e1de7dd1b305b810bfaa15f", 238),
        _test("SVAMP", "ffed015784f738f317c5603177861d044c4fc94e09211d78b25e96d46c656e2c", 1000),
        _test("AddSub", "62a8662b1ad40879953c4df0e61883a749d03aa3fc5e71f1cdb842b816e139ff", 395),
        _test("MultiArith", "a40f426807c8a563802c2a5b66bda3bcd1eba9c099038fd1199f0dd57de5fd28", 600),
        _test("SingleEq", "712b15edb851c97aab42a5de106d94008f94d917366c92537ed5400a8aacb207", 508),
        _test("mathqa", "58715cb7aaccc7f3f2994586073800a57a3e44f77d22e62bee7fd7ff8315172c", 2985, source=None),
        _test("boolq", "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9", 3270),
        _test("piqa", "3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141", 1838),
        _test("social_i_qa", "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d", 1954),
        # The first 36 records of LLM-Adapters' HellaSwag test file: the only part available offline, no URL of its own.
        _test(
            "hellaswag",
            "35a56361a90c4fc15ac9dc455ed5967bcbf8b139130ee7a864c5473d33239288",
            36,
            path="llm-adapters/dataset/hellaswag/test_subset36.json",
            url=None,
        ),
        DataFile(
            "hellaswag_full_test",
            "llm-adapters/dataset/hellaswag/test.json",
            "test",
            f"{_LLM_ADAPTERS}/dataset/hellaswag/test.json",
            None,
            None,
            "hellaswag",
        ),
        _test("winogrande", "6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9", 1267),
        _test("ARC-Easy", "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc", 2376),
        _test("ARC-Challenge", "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7", 1172),
        _test("openbookqa", "8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e", 500),
        # GSM8K as OpenAI publishes it; the training set below is built from train.jsonl.
        DataFile(
            "gsm8k_test_jsonl",
            "gsm8k/test.jsonl",
            "test",
            f"{_GSM8K}/test.jsonl",
            "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
            1319,
            "gsm8k",
        ),
        DataFile(
            "gsm8k_train_jsonl",
            "gsm8k/train.jsonl",
            "raw",
            f"{_GSM8K}/train.jsonl",
            "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
            7473,
        ),
        # Training sets. Never LLM-Adapters' ft-training_set/math_data.json: its questions come from the test sets.
        DataFile(
            "gsm8k_train",
            "gsm8k/gsm8k_train_llm_adapters_format.json",
            "train",
            None,
            "4b8547185b90afa566c82b83cea2c93e1e31d826614a13c168bd3f3cdc628208",
            7473,
            "gsm8k",
            derived_from="gsm8k_train_jsonl",
            build=_build_gsm8k_train,
        ),
        # MAWPS train in its raw form (original_text, equation, ans); nlsflow.data.datasets converts it.
        DataFile(
            "mawps_train",
            "llm-adapters/dataset/mawps/trainset.json",
            "train",
            f"{_LLM_ADAPTERS}/dataset/mawps/trainset.json",
            "42e631004e46e71f5e050bfd6f0af2e27c9d76315cee66cc6412d66a19b47c1a",
            1898,
            "mawps",
        ),
        _train("boolq", "5ccbaceebaddc69765e1c4a363632196b81851d303696672165ab59ec4e48c83", 9427),
        _train("ARC-Easy", "6a06cece3dec32f4fb1c1b0fc29dab14be7cf3053b417290dbc6cd845359f5ff", 2251),
        _train("ARC-Challenge", "a9debff28aafed86a08211dc3584a3b6cb38edca8c56bb34cd5002ed54aeebfb", 1119),
        _train("openbookqa", "a1e094eeea01f70c0baa880f37497b26700ae99b243927b9c529984de9b1fe90", 4957),
        # Converted from the original datasets into LLM-Adapters' templates (data README, SOURCES-commonsense-train):
        # PIQA's and Social IQa's equal LLM-Adapters' own train.json; WinoGrande's is the XL split, not their file.
        _train("piqa", "d750ea06e70ce6af746f8315d2952a0a1488520794f934fd1f000286575e5702", 16113),
        _train("social_i_qa", "1ca995d6055a6be053bb54b4b4c7abe4cd0323940079071932c1f9129d589b17", 33410),
        replace(
            _train("winogrande", "81ad5c9f9070a4d867eb0b978944b10e3f188843d791e7aaada29ca9e5f9c347", 40398), url=None
        ),
        _ft_training_set("math_10k"),
        _ft_training_set("commonsense_15k"),
        _ft_training_set("commonsense_170k"),
        # Text for pruning calibration and perplexity.
        DataFile(
            "wikitext2_valid",
            "wikitext-2/valid.txt",
            "calibration",
            f"{_WIKITEXT2}/valid.txt",
            "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        ),
        DataFile(
            "wikitext2_test",
            "wikitext-2/test.txt",
            "perplexity",
            f"{_WIKITEXT2}/test.txt",
            "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        ),
        # The C4 shard Wanda calibrates on (allenai/c4 on the Hugging Face hub), JSON lines with a `text` field.
        DataFile(
            "c4_train_shard",
            f"c4/{_C4_SHARD}",
            "calibration",
            f"https://huggingface.co/datasets/allenai/c4/resolve/main/{_C4_SHARD}",
            None,
        ),
    )
}


def data_files(role: Role) -> list[str]:
    """Names of the registered files with `role`, in registry order."""
    return [f.name for f in DATA_FILES.values() if f.role == role]


def read_records(path: Path) -> list[dict]:
    """Records of a JSON list, a JSON-lines file, or a gzipped JSON-lines file (`.json.gz`)."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); replace it with a fresh copy") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, expected a list of records")
    return records


def resolve_data_file(data_root: Path, name: str, *, download: bool = True) -> Path:
    """The verified path of registered file `name` under `data_root`, fetched or built first when missing.

    Present: its sha256 is checked when registered (once per process and file version). Missing: built from the
    file it derives from, else downloaded from its URL when `download` (temp file beside the target, checked,
    then renamed). Otherwise MissingDataError, one line with the path, the URL and how to provide the file.
    """
    if name not in DATA_FILES:
        raise ValueError(f"unknown data file {name!r}; registered: {', '.join(DATA_FILES)}")
    entry = DATA_FILES[name]
    target = Path(data_root) / entry.path
    if target.is_file():
        _verify(entry, target)
        return target
    if entry.derived_from is not None:
        try:
            source = resolve_data_file(data_root, entry.derived_from, download=download)
        except MissingDataError as err:
            raise MissingDataError(
                f"missing data file {target} ({name}), built from {entry.derived_from}: {err}"
            ) from None
        log.info("building %s from %s", target, source)
        try:
            _write_checked(entry, target, lambda tmp: tmp.write_bytes(entry.build(source)))
        except OSError as err:  # e.g. a read-only data root
            raise MissingDataError(
                f"missing data file {target} ({name}): building it from {source} failed "
                f"({type(err).__name__}: {err}); {_fix(target, entry)}"
            ) from None
        return target
    fix = _fix(target, entry)
    if entry.url is None:
        raise MissingDataError(f"missing data file {target} ({name}); it has no download URL: {fix}")
    if not download:
        raise MissingDataError(
            f"missing data file {target} ({name}) and downloads are off: fetch {entry.url} "
            f"(or set data.download=true), or {fix}"
        )
    log.info("downloading %s to %s", entry.url, target)
    try:
        _write_checked(entry, target, lambda tmp: _fetch(entry, tmp))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # offline, HTTP error, timeout...
        plain_url_error = isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError)
        reason = " ".join(str(err.reason if plain_url_error else err).split())
        raise MissingDataError(
            f"missing data file {target} ({name}): downloading {entry.url} failed "
            f"({type(err).__name__}: {reason}); {fix}"
        ) from None
    return target


def _fix(target: Path, entry: DataFile) -> str:
    return f"put the file at {target}, or set data.root=... to a folder that holds {entry.path}"


# (resolved path, size, mtime_ns) -> sha256 checked in this process; a rewritten file is checked again.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(entry: DataFile, path: Path) -> None:
    if entry.sha256 is None:
        return
    key = _file_key(path)
    if _VERIFIED.get(key) == entry.sha256:
        return
    actual = _sha256(path)
    if actual != entry.sha256:
        where = f"from {entry.url}" if entry.url else "(the original copy)"
        raise DataIntegrityError(
            f"data file {path} ({entry.name}) has sha256 {actual[:16]}..., expected "
            f"{entry.sha256[:16]}...: replace it with a fresh copy {where}, or delete it to "
            f"{'download' if entry.url else 'see what is missing'}"
        )
    _VERIFIED[key] = actual


def _fetch(entry: DataFile, tmp: Path) -> None:
    """Stream `entry.url` into `tmp` with a progress bar; a short read fails."""
    request = urllib.request.Request(entry.url, headers={"User-Agent": "nlsflow"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {entry.name}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise OSError(f"connection closed after {received} of {total} bytes")


def _count_records(path: Path) -> int | None:
    try:
        return len(read_records(path))
    except (ValueError, OSError, EOFError):  # not JSON (or truncated gzip): fails the record check
        return None


def _write_checked(entry: DataFile, target: Path, write: Callable[[Path], object]) -> None:
    """Write the file through `write(tmp)` beside `target`, check digest and record count, rename into place.

    On any failure the temp file and the folders created for it are removed: nothing is left behind."""
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes owner-only files; data roots are shared
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        actual = _sha256(tmp)
        if entry.sha256 is not None and actual != entry.sha256:
            raise DataIntegrityError(
                f"{entry.url or entry.derived_from} gave {entry.path} ({entry.name}) with sha256 "
                f"{actual[:16]}..., expected {entry.sha256[:16]}...: the source changed or the "
                f"transfer was corrupted; nothing was written, put a verified copy at {target}"
            )
        if entry.records is not None and (count := _count_records(tmp)) != entry.records:
            raise DataIntegrityError(
                f"{entry.url or entry.derived_from} gave {entry.path} ({entry.name}) with {count} "
                f"records, expected {entry.records}: nothing was written, put a verified copy "
                f"at {target}"
            )
        os.replace(tmp, target)
        _VERIFIED[_file_key(target)] = actual
        log.info("%s: %s (sha256 %s)", entry.name, target, actual)
    finally:
        tmp.unlink(missing_ok=True)
        if not target.exists():
            for folder in created:  # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    break
