"""The data registry: digests of the shared files, building GSM8K train, and downloads from a local HTTP server."""

import gzip
import hashlib
import json
import os
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DATA_ROOT, needs_data

from nlsflow.data import registry
from nlsflow.data.datasets import EVAL_DATASETS
from nlsflow.data.registry import (
    DATA_FILES,
    DataFile,
    DataIntegrityError,
    MissingDataError,
    data_files,
    gsm8k_to_llm_adapters,
    read_records,
    resolve_data_file,
)
from nlsflow.errors import NlsflowError

pytestmark = pytest.mark.timeout(120)

# Files nobody here has seen: no digest (and no record count) registered.
UNSEEN = {"hellaswag_full_test", "math_10k", "commonsense_15k", "commonsense_170k", "c4_train_shard"}


def test_registry_entries_are_well_formed():
    for name, entry in DATA_FILES.items():
        assert entry.name == name
        assert entry.role in ("test", "train", "calibration", "perplexity", "raw")
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), name
        assert entry.url is None or entry.url.startswith("https://"), name
        # shared copies only: HellaSwag's test subset, and WinoGrande's XL train split (not LLM-Adapters' file)
        assert entry.url or entry.derived_from or name in ("hellaswag_test", "winogrande_train"), name
        assert entry.source is None or entry.source in EVAL_DATASETS, name
        assert "math_data" not in entry.path
    assert {n for n, e in DATA_FILES.items() if e.sha256 is None} == UNSEEN
    assert len({e.path for e in DATA_FILES.values()}) == len(DATA_FILES)
    for name, dataset in EVAL_DATASETS.items():  # every test set is registered, at the path evaluation reads
        assert DATA_FILES[f"{name}_test"].role == "test"
        assert DATA_FILES[f"{name}_test"].path == dataset.path
    assert set(data_files("train")) == {
        "gsm8k_train",
        "mawps_train",
        "boolq_train",
        "ARC-Easy_train",
        "ARC-Challenge_train",
        "openbookqa_train",
        "piqa_train",
        "social_i_qa_train",
        "winogrande_train",
        "math_10k",
        "commonsense_15k",
        "commonsense_170k",
    }
    assert DATA_FILES["gsm8k_test"].url == (
        "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset/gsm8k/test.json"
    )
    assert DATA_FILES["math_10k"].url.endswith("/LLM-Adapters/main/ft-training_set/math_10k.json")
    assert DATA_FILES["gsm8k_train_jsonl"].url == (
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl"
    )
    assert DATA_FILES["c4_train_shard"].url == (
        "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz"
    )


@needs_data
@pytest.mark.parametrize("name", sorted(set(DATA_FILES) - UNSEEN))
def test_registered_digest_and_count_match_the_shared_file(name):
    entry = DATA_FILES[name]
    path = DATA_ROOT / entry.path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    if entry.records is not None:
        assert len(read_records(path)) == entry.records
    assert resolve_data_file(DATA_ROOT, name, download=False) == path


@needs_data
def test_gsm8k_train_is_built_from_train_jsonl_byte_for_byte(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    shutil.copy(DATA_ROOT / "gsm8k" / "train.jsonl", tmp_path / "gsm8k" / "train.jsonl")
    built = resolve_data_file(tmp_path, "gsm8k_train", download=False)
    assert built.read_bytes() == (DATA_ROOT / DATA_FILES["gsm8k_train"].path).read_bytes()
    assert sorted(p.name for p in built.parent.iterdir()) == ["gsm8k_train_llm_adapters_format.json", "train.jsonl"]


def test_gsm8k_conversion():
    raw = {"question": "Q?", "answer": "She pays 1,000+80 = <<1000+80=1080>>1,080.\n#### 1,080"}
    assert gsm8k_to_llm_adapters(raw) == {
        "instruction": "Q?",
        "input": "",
        "output": "She pays 1,000+80 = 1,080. The answer is 1080.",
        "answer": "1080",
    }


def test_derived_file_without_its_source_says_both(tmp_path):
    with pytest.raises(MissingDataError) as err:
        resolve_data_file(tmp_path, "gsm8k_train", download=False)
    message = str(err.value)
    assert "\n" not in message
    assert "gsm8k_train_llm_adapters_format.json" in message and "train.jsonl" in message
    assert DATA_FILES["gsm8k_train_jsonl"].url in message
    assert not any(tmp_path.iterdir())


@needs_data
def test_checksum_mismatch_of_a_present_file_is_one_line(tmp_path, monkeypatch):
    relpath = DATA_FILES["AQuA_test"].path
    (tmp_path / relpath).parent.mkdir(parents=True)
    shutil.copy(DATA_ROOT / relpath, tmp_path / relpath)
    calls = []
    real_sha256 = registry._sha256
    monkeypatch.setattr(registry, "_sha256", lambda path: calls.append(path) or real_sha256(path))
    resolve_data_file(tmp_path, "AQuA_test")
    resolve_data_file(tmp_path, "AQuA_test")
    assert len(calls) == 1  # verified once per process

    with open(tmp_path / relpath, "ab") as f:  # a changed file is checked again
        f.write(b" ")
    with pytest.raises(DataIntegrityError) as err:
        resolve_data_file(tmp_path, "AQuA_test")
    message = str(err.value)
    assert "\n" not in message and len(calls) == 2
    assert str(tmp_path / relpath) in message
    assert "expected de677f5f01393400" in message  # the registered digest's prefix
    assert DATA_FILES["AQuA_test"].url in message and "delete it to download" in message
    assert isinstance(err.value, NlsflowError)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown data file 'gsm8k_hard'; registered: gsm8k_test"):
        resolve_data_file(Path("."), "gsm8k_hard")


def test_file_without_url_is_one_line(tmp_path):
    with pytest.raises(
        MissingDataError,
        match=r"^missing data file .*test_subset36\.json \(hellaswag_test\); it has "
        r"no download URL: put the file at .* or set data\.root=\.\.\.",
    ) as err:
        resolve_data_file(tmp_path, "hellaswag_test")
    assert "\n" not in str(err.value)


# -- downloads, against a server on 127.0.0.1 --------------------------------------------------------------------

RECORDS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "answer": str(i)} for i in range(3)]
PAYLOAD = json.dumps(RECORDS).encode()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server():
    """A local HTTP server; `routes[path]` is bytes to serve or a function of the request handler."""
    routes: dict = {}
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
            elif callable(route):
                route(self)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(route)))
                self.end_headers()
                self.wfile.write(route)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}", routes=routes, release=release)
    release.set()
    httpd.shutdown()
    httpd.server_close()


def register(
    monkeypatch, url: str, *, sha256: str | None = SHA, records: int | None = 3, path: str = "toy/sub/toy.json"
) -> DataFile:
    entry = DataFile("toy", path, "train", url, sha256, records)
    monkeypatch.setitem(DATA_FILES, "toy", entry)
    return entry


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_download_streams_to_a_temp_file_then_renames(tmp_path, server, monkeypatch, capsys):
    seen = {}

    def slow_payload(handler):  # half the body, a look at the data root, the rest
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(PAYLOAD)))
        handler.end_headers()
        handler.wfile.write(PAYLOAD[:10])
        handler.wfile.flush()
        time.sleep(0.3)
        seen["during"] = leftovers(tmp_path)
        handler.wfile.write(PAYLOAD[10:])

    server.routes["/toy.json"] = slow_payload
    register(monkeypatch, f"{server.url}/toy.json")
    path = resolve_data_file(tmp_path, "toy")
    assert path == tmp_path / "toy" / "sub" / "toy.json"
    assert path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["toy", "toy/sub", "toy/sub/toy.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by others as any file, not owner-only
    during = [p for p in seen["during"] if p.startswith("toy/sub/")]
    assert len(during) == 1 and re.fullmatch(r"toy/sub/\.toy\.json\..*\.part", during[0])  # not at the final path
    err = capsys.readouterr().err
    assert "download toy" in err and "100%" in err  # the progress bar
    assert resolve_data_file(tmp_path, "toy", download=False) == path  # present now, verified from the cache


def test_download_from_a_file_url(tmp_path, monkeypatch):
    source = tmp_path / "mirror" / "toy.json"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    register(monkeypatch, source.as_uri())
    assert resolve_data_file(tmp_path / "root", "toy").read_bytes() == PAYLOAD


def test_download_with_a_wrong_checksum_leaves_nothing(tmp_path, server, monkeypatch):
    server.routes["/toy.json"] = PAYLOAD + b" "
    register(monkeypatch, f"{server.url}/toy.json")
    with pytest.raises(DataIntegrityError) as err:
        resolve_data_file(tmp_path, "toy")
    message = str(err.value)
    assert "\n" not in message and f"expected {SHA[:16]}" in message and f"{server.url}/toy.json" in message
    assert leftovers(tmp_path) == []  # no temp file, not even the folders made for it


def test_download_with_a_wrong_record_count_leaves_nothing(tmp_path, server, monkeypatch):
    server.routes["/toy.json"] = PAYLOAD
    register(monkeypatch, f"{server.url}/toy.json", sha256=None, records=4)
    with pytest.raises(DataIntegrityError, match="with 3 records, expected 4"):
        resolve_data_file(tmp_path, "toy")
    assert leftovers(tmp_path) == []


def test_truncated_download_leaves_nothing(tmp_path, server, monkeypatch):
    def truncated(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(PAYLOAD) + 100))
        handler.end_headers()
        handler.wfile.write(PAYLOAD)
        handler.close_connection = True

    server.routes["/toy.json"] = truncated
    register(monkeypatch, f"{server.url}/toy.json", sha256=None, records=None)
    (tmp_path / "toy").mkdir()  # an existing folder stays
    with pytest.raises(MissingDataError, match="downloading .*/toy.json failed"):
        resolve_data_file(tmp_path, "toy")
    assert leftovers(tmp_path) == ["toy"]


def test_offline_errors_are_one_line_and_name_the_url(tmp_path, server, monkeypatch):
    url = f"{server.url}/toy.json"
    register(monkeypatch, url)
    target = tmp_path / "toy" / "sub" / "toy.json"
    with pytest.raises(MissingDataError) as err:
        resolve_data_file(tmp_path, "toy", download=False)
    assert str(err.value) == (
        f"missing data file {target} (toy) and downloads are off: fetch {url} (or set "
        f"data.download=true), or put the file at {target}, or set data.root=... to a folder "
        "that holds toy/sub/toy.json"
    )

    with pytest.raises(MissingDataError) as err:  # 404
        resolve_data_file(tmp_path, "toy")
    assert "\n" not in str(err.value)
    assert f"downloading {url} failed (HTTPError: HTTP Error 404: Not Found); put the file at {target}" in str(
        err.value
    )

    register(monkeypatch, "http://127.0.0.1:9/toy.json")  # nothing listens on the discard port
    with pytest.raises(FileNotFoundError, match=r"downloading http://127\.0\.0\.1:9/toy\.json failed \(URLError"):
        resolve_data_file(tmp_path, "toy")
    assert leftovers(tmp_path) == []


def test_a_silent_server_times_out(tmp_path, server, monkeypatch):
    server.routes["/toy.json"] = lambda handler: server.release.wait(30)
    register(monkeypatch, f"{server.url}/toy.json")
    monkeypatch.setattr(registry, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(MissingDataError, match="timed out"):
        resolve_data_file(tmp_path, "toy")
    assert time.monotonic() - start < 10
    assert leftovers(tmp_path) == []


def test_gzipped_json_lines_are_records(tmp_path):
    with gzip.open(tmp_path / "c4.json.gz", "wt") as f:
        f.write('{"text": "a"}\n{"text": "b"}\n')
    assert read_records(tmp_path / "c4.json.gz") == [{"text": "a"}, {"text": "b"}]


@needs_data
def test_an_unwritable_data_root_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    shutil.copy(DATA_ROOT / "gsm8k" / "train.jsonl", tmp_path / "gsm8k" / "train.jsonl")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(registry.tempfile, "mkstemp", read_only)
    with pytest.raises(MissingDataError) as err:
        resolve_data_file(tmp_path, "gsm8k_train")
    assert "\n" not in str(err.value)
    assert re.search(
        r"\(gsm8k_train\): building it from .*train\.jsonl failed \(PermissionError: .*Permission "
        r"denied\); put the file at ",
        str(err.value),
    )
    assert leftovers(tmp_path) == ["gsm8k", "gsm8k/train.jsonl"]
