"""Preference data: JSONL or a list of dicts → tokenized pairs → padded batches for DPO.

A record is `{"prompt": str, "chosen": str, "rejected": str}`, or conversational: `prompt` a list
of messages (`{"role", "content"}`) and `chosen`/`rejected` an assistant message list (or a
string, taken as one assistant message); without `prompt`, chosen and rejected are whole
conversations and their common leading messages are the prompt. Whole conversations that start
with the prompt's messages (UltraFeedback's shape) have them removed, as TRL's
`maybe_extract_prompt` does. Conversational records need a tokenizer with a chat template. A
string record without `prompt` (Anthropic HH: "\n\nHuman: ...\n\nAssistant: ...") has the
longest common prefix of chosen and rejected up to its last "\n\nAssistant:" as its prompt.

Tokenization:
- string records: the prompt is `prompt_template` with `{prompt}` replaced, tokenized with the
  tokenizer's special tokens (a leading `<s>` where the tokenizer adds one, never a trailing eos
  of a tokenizer that appends one); each response is tokenized without special tokens and ends
  with eos. Text that holds them already (data exported with its template applied:
  "<s>[INST] ...", "...</s>") gets no second bos or eos.
- conversational records: the prompt is the chat template over the prompt messages with the
  generation prompt (`prompt_template` is not applied: the HF modules say so once, naming the
  key and the data file); a response is what the template adds for its messages (its
  end-of-turn tokens included, no extra eos). Prompt and responses are tokenized separately, so
  a merge across their boundary never hides where the response starts.

Truncation, applied in this order (cf. TRL's `max_prompt_length` / `max_length`):
1. a prompt longer than `max_prompt_length` keeps its last `max_prompt_length` tokens (the end of
   a prompt is what the response answers);
2. if prompt + the longer response exceeds `max_length`, the prompt loses tokens from the left,
   but keeps at least `min_prompt_length` tokens (default max_length // 2) or all it has;
3. each response is then cut from the right to fit `max_length` (it then has no eos).
Left truncation of the prompt keeps a leading bos token, even where no token is to be kept
(min_prompt_length 0: the prompt is then that bos alone, after which the response's first token
is scored). A text far longer than max_length tokens can cover (`PairTokenizer.max_chars`: twice
max_length + 1 of the tokenizer's longest token) is cut before it is tokenized, keeping a
prompt's end and a response's start, so a huge line costs what its kept tokens cost; should the
cut text give too few tokens (a normalizer folding many characters into one), the whole text is
tokenized after all.
A pair whose responses are identical after truncation is kept (its DPO gradient is zero), and
counted in `num_identical`; those identical in the data already, not by truncation, are also
counted in `num_identical_in_data` (the summary tells the two apart). A pair with a response of
no token (a chat template rendering nothing for it) is kept, counted in `num_empty_responses`
and said in the summary (which the HF modules log as a warning). So is a pair whose chosen or
rejected text is empty or whitespace only in the data (`num_blank_responses`: a scrape or a
generation that failed): it still scores as eos alone, which DPO then teaches as an answer.
A string pair whose chosen and rejected both start with its whole prompt (8 characters or more:
HH dialogues or implicit-prompt pairs given a prompt key without removing it from them) is kept
as written and counted in `num_prompt_in_responses` (the prompt is trained as a part of each
answer; message lists have such leading messages removed instead). So is one with a
"\n\nHuman:" turn inside chosen or rejected (`num_turns_in_responses`: HH dialogues that differ
before their last turn; the model would learn to write the human's turns, where a message list
with a user turn in a response is refused). So is a record with a system prompt under a key of
its own (`num_unused_system`: "system" or "system_prompt", as Intel/orca_dpo_pairs has): no rule
reads it, so it trains without it.
Records that repeat an earlier one (the same prompt, chosen and rejected as written) are kept,
each trained as often as it occurs, and counted in `num_duplicates` and the summary (a data set
concatenated twice, or a merge of overlapping sources, doubles some pairs' weight unseen).
The summary names the first pair of each kind it counts ("the first: sample i", the records
counted from 0, as errors name "sample i of the <split> data set").

Batches (see chatlearn.algorithms.dpo for the convention): `chosen_input_ids`,
`chosen_attention_mask`, `chosen_loss_mask` and the same `rejected_*`, right-padded.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import re
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, SupportsIndex, cast, overload

import torch
from torch.utils.data import Dataset

from chatlearn.config.errors import ConfigError, sample_where
from chatlearn.hf.tokenizer import has_chat_template

PROMPT_PLACEHOLDER = "{prompt}"


def load_preference_data(
    source: str | Path | Iterable[Mapping[str, Any]], limit: int | None = None
) -> list[dict]:
    """Records from a JSONL file (one JSON object a line; blank lines skipped) or an iterable.

    With ``limit`` (ChatLearn's ``training_data_num_limit``; None or negative: all), the first
    ``limit`` records only: a file is read no further than them (reading a 2 GB file whole to
    keep 1,000 records took 25 s and 3.2 GiB).

    Anything that is not a prompt/chosen/rejected record is a ValueError naming the first bad
    record, where it is, and what the whole input was (e.g. the guide's `["test"] * 4096`)."""
    if limit is not None and limit < 0:
        limit = None
    if isinstance(source, str | Path):
        path = Path(source)
        records = PreferenceRecords([], path, array("q"))
        number = 0
        try:
            with _open_lines(path) as handle:
                for number, raw in enumerate(_lines(handle, path), start=1):
                    if limit is not None and len(records) >= limit:
                        break
                    line = _decoded(raw, number, path)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        if number == 1 and line.lstrip().startswith("["):
                            raise ValueError(_ARRAY_FILE.format(path=path)) from None
                        last = not raw.endswith(b"\n")
                        hint = _not_json_hint(line, exc, last=last, first=number == 1)
                        raise ValueError(f"{path}:{number}: not valid JSON: {exc}{hint}") from None
                    except RecursionError:  # was a traceback out of json's decoder
                        raise ValueError(
                            f"{path}:{number}: nested too deeply to be read (lists or objects "
                            "inside one another past Python's recursion limit, where a record "
                            "nests 3 levels); correct or delete that line"
                        ) from None
                    if number == 1 and isinstance(record, list) and record:
                        if all(isinstance(item, Mapping) for item in record):
                            raise ValueError(_ARRAY_FILE.format(path=path))
                    if number == 1 and isinstance(record, Mapping) and "chosen" not in record:
                        _check_wrapped(record, path)
                    where = f"{path}:{number}"
                    if _MAYBE_SURROGATE.search(line):  # only an escape can put one in
                        _check_text(record, where)
                    records.add(_check_record(record, where, in_file=True), number)
        except OSError as exc:  # missing, a directory, unreadable, a broken gzip stream
            if path.is_dir():  # a data set's folder (a Hub download, datasets' save_to_disk)
                raise ValueError(_directory_error(path)) from None
            raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        except EOFError:  # a gzip file cut short
            raise ValueError(f"{path}: cannot read it (a gzip file cut short)") from None
        except zlib.error as exc:  # a gzip file with corrupted bytes
            raise ValueError(f"{path}: cannot read it (a damaged gzip file: {exc})") from None
        except MemoryError:  # was a bare MemoryError traceback from inside json
            count = len(records)
            records.clear()  # room for the error itself
            raise ValueError(
                f"{path}: ran out of memory at line {number}, after {count:,} records: the "
                "records are held in memory whole (1.5-5 times the file's size in this process, "
                "more for short records, and again in each reference replica while it tokenizes "
                "them); give the run more memory, or fewer records (training_data_num_limit, or "
                "a smaller file)"
            ) from None
        if not records and limit != 0:
            # "the file is empty" of a file of blank lines sent its reader to look at its size
            what = "the file is empty" if number == 0 else f"its {number:,} lines are all blank"
            raise ValueError(f"{path}: no records ({what})")
        return records
    samples = list(source if limit is None else itertools.islice(source, limit))
    given = f"the {_describe_samples(samples)} given to build_dataset"
    checked = [_check_record(r, f"sample {i} of {given}") for i, r in enumerate(samples)]
    for i, record in enumerate(checked):
        _check_text(record, f"sample {i} of {given}")
    return checked


# how much of a first line is read before one that opens a JSON array is refused as one
ARRAY_HEAD_BYTES = 1 << 20


def _lines(handle: IO[bytes], path: Path) -> Iterator[bytes]:
    """The file's lines; a first line that opens a JSON array and runs past
    `ARRAY_HEAD_BYTES` is the JSON array error at once. ``json.dump(records, f)`` writes a
    whole data set on one line, which was read, decoded and parsed whole only to be told it is
    an array: 0.9 GB of memory and 3.6 s for a 194 MB file, a machine's memory for one of
    tens of GB (killed by the OOM killer, without a word)."""
    first = handle.readline(ARRAY_HEAD_BYTES)
    if len(first) == ARRAY_HEAD_BYTES and not first.endswith(b"\n"):
        if first.removeprefix(UTF8_BOM).lstrip().startswith(b"["):
            raise ValueError(_ARRAY_FILE.format(path=path))
        first += handle.readline()  # a long record: the rest of its line
    if first:
        yield first
    yield from handle


def _not_json_hint(line: str, exc: json.JSONDecodeError, *, last: bool, first: bool) -> str:
    """What a line that is not JSON most likely is, and its fix ("" when that is not clear):
    json's message alone ("Expecting property name enclosed in double quotes", "Extra data")
    said neither that the file's last line was cut short (a copy or a write that did not
    finish), nor that its records were pretty-printed over several lines, nor that two records
    shared a line, nor that the file was a CSV or TSV table."""
    if "\x00" in line:
        # a file whose write stopped (a crash, a full disk) often ends in zero bytes: "Expecting
        # value: line 1 column 1" did not say so
        where = "the file's end" if last else "the line"
        what = "only zero bytes" if not line.replace("\x00", "").strip() else "zero bytes"
        return (
            f" ({where} holds {what}: left by a write that did not finish, a crash or a full "
            "disk?); delete them, e.g. tr -d '\\000' < in.jsonl > out.jsonl, and check that "
            "the records before them are whole"
        )
    header = re.split(r"[,\t]", line.strip().lower())
    if (
        first
        and not line.lstrip().startswith(("{", "["))
        and {"chosen", "rejected"} <= {name.strip().strip('"') for name in header}
    ):
        sep = "\\t" if "\t" in line else ","
        return (
            "; it is a CSV/TSV table (its first line names the columns): convert it, e.g. "
            "python -c \"import pandas; pandas.read_csv('in.csv', sep='" + sep + "')"
            ".to_json('out.jsonl', orient='records', lines=True, force_ascii=False)\""
        )
    if exc.msg == "Extra data" and line[exc.pos :].lstrip().startswith("{"):
        if line[: exc.pos].rstrip(" \t").endswith("\r"):  # no \n: lines end with \r alone
            return (
                " (the file's lines end with a carriage return alone, as classic Mac OS wrote "
                "them); convert them to line feeds, e.g. tr '\\r' '\\n' < in.jsonl > out.jsonl"
            )
        return " (two records on one line: a line end is missing between them)"
    ended = exc.msg.startswith("Unterminated string") or exc.pos >= len(line.rstrip())
    if not ended or not line.lstrip().startswith("{"):
        return ""
    if last:  # no line end after it: the file ends inside the record
        return (
            " (the file's last line ends inside its record: cut short, by a copy or a write "
            "that did not finish?); complete that line or delete it"
        )
    if line.rstrip()[-1:] in ("{", "[", ",", ":"):
        return (
            " (the record goes on past the line's end: JSONL holds each record on one line, "
            "not indented over several as pretty-printed JSON is); write each record on one "
            "line (json.dumps(record), no indent), e.g. jq -c . in.json > out.jsonl"
        )
    return ""


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow")


def _directory_error(path: Path) -> str:
    """A directory given as a data file: the data files in it (up to three levels down, as a
    Hub download's data/train-*.parquet), so the user can name one; "cannot read it (Is a
    directory)" named none."""
    entries = (file for depth in ("*", "*/*", "*/*/*") for file in path.glob(depth))
    found = sorted(  # at most 10,000 entries looked at: the path could be / or a home
        str(file.relative_to(path))
        for file in itertools.islice(entries, 10_000)
        if file.name.endswith(DATA_SUFFIXES) and file.is_file()
    )
    if not found:
        return f"{path}: a directory, with no data file in it; give the path of a JSONL file"
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return f"{path}: a directory; give the path of one JSONL file in it (it holds {shown})"


GZIP_MAGIC = b"\x1f\x8b"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = b"\xef\xbb\xbf"


# columnar files a data set often comes as (the Hub's parquet; datasets' save_to_disk .arrow),
# and a command that converts each to JSONL ({src}, {out}: file names)
_DATASETS = "from datasets import Dataset; Dataset.{reader}('{{src}}').to_json('{{out}}')"
BINARY_FORMATS = {
    b"PAR1": ("a Parquet file", _DATASETS.format(reader="from_parquet")),
    b"ARROW1": (
        "an Arrow (Feather) file",
        "import pandas; pandas.read_feather('{src}').to_json('{out}', orient='records', "
        "lines=True, force_ascii=False)",
    ),
    b"\xff\xff\xff\xff": (
        "an Arrow stream (the .arrow files of datasets' save_to_disk)",
        _DATASETS.format(reader="from_file"),
    ),
}


@contextlib.contextmanager
def _open_lines(path: Path) -> Iterator[IO[bytes]]:
    """The file's lines as bytes; a gzip file (its magic bytes, whatever its name) is read
    through gzip. Opened once and peeked at, so a pipe (``/dev/stdin``) keeps its first bytes.
    A Parquet or Arrow file is a ValueError saying so, with a command converting it: it was
    "not UTF-8 text", with advice to convert it from Latin-1."""
    with path.open("rb") as handle:
        head = handle.peek(8)
        for magic, (kind, command) in BINARY_FORMATS.items():
            if head.startswith(magic):
                out = path.with_suffix(".jsonl").name
                if out == path.name:  # never the file itself
                    out = f"{path.stem}.converted.jsonl"
                convert = command.format(src=path.name, out=out)
                raise ValueError(
                    f'{path}: {kind}, not JSONL text; convert it: python -c "{convert}"'
                )
        if head[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=handle, mode="rb") as unzipped:
                yield cast(IO[bytes], unzipped)
        else:
            yield handle


def _decoded(raw: bytes, number: int, path: Path) -> str:
    """Line ``number`` as text: UTF-8 (a byte-order mark at a line's start skipped: Windows tools
    write one, and ``cat a.jsonl b.jsonl`` puts b's inside the file, where it was "not valid
    JSON: Unexpected UTF-8 BOM"); anything else is a ValueError naming the line and byte, with a
    hint for UTF-16 files."""
    if number == 1 and raw.startswith(UTF16_BOMS):
        raise ValueError(
            f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8, "
            f"e.g. iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}"
        )
    try:
        line = raw.decode("utf-8")  # per line: "utf-8-sig" took twice as long (697 ns, 331)
    except UnicodeDecodeError as exc:
        byte = raw[exc.start : exc.start + 1].hex()
        raise ValueError(
            f"{path}:{number}: not UTF-8 text (byte 0x{byte} at byte {exc.start} of the line); "
            f"save the file as UTF-8, e.g. iconv -f latin1 -t UTF-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix} if it is Latin-1"
        ) from None
    return line[1:] if line.startswith("\ufeff") else line


# a JSON escape of a UTF-16 surrogate (valid JSON; alone it is no Unicode text)
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_text(value: Any, where: str, path: str = "") -> None:
    """Every string in ``value`` is Unicode text: a lone surrogate (a truncated emoji's
    ``"\\ud83d"``) crashed deep in the tokenizer or the transport, naming no record."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start : exc.end].encode("utf-16", "surrogatepass")[2:]
            escape = "".join(f"\\u{bad[i + 1]:02x}{bad[i]:02x}" for i in range(0, len(bad), 2))
            raise ValueError(
                f"{where}: key {path or '(the record)'} holds a lone surrogate escape "
                f"({escape}, at character {exc.start}), which is not text; write the "
                "character itself, or its whole surrogate pair (e.g. \\ud83d\\ude00)"
            ) from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_text(key, where, path)
            _check_text(item, where, f"{path}[{key!r}]" if path else repr(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_text(item, where, f"{path}[{i}]")


class PreferenceRecords(list):
    """The records of a data file, with the line each came from: ``origin(i)`` is
    ``"path:line"`` of record ``i``, which the engine names when a module's `build_dataset`
    refuses sample ``i`` (engine.set_dataset keeps it). Slices keep their lines."""

    def __init__(self, records: Iterable[dict], path: Path, lines: array | None) -> None:
        super().__init__(records)
        self.path, self.lines = path, lines

    def origin(self, index: int) -> str:
        """``path:line`` of record ``index``; a ValueError once the list was changed in place
        (shuffled, sorted, edited: its lines no longer follow its records)."""
        if self.lines is None:
            raise ValueError("the records were changed in place: their lines are not known")
        return f"{self.path}:{self.lines[index]}"

    def add(self, record: dict, line: int) -> None:
        """The loader's append: the record and its line."""
        super().append(record)
        if self.lines is not None:
            self.lines.append(line)

    def _changed(self) -> None:
        self.lines = None

    def __setitem__(self, index: Any, value: Any) -> None:
        self._changed()
        super().__setitem__(index, value)

    def __delitem__(self, index: Any) -> None:
        self._changed()
        super().__delitem__(index)

    def __iadd__(self, other: Iterable[dict]) -> PreferenceRecords:  # type: ignore[override,misc]
        self._changed()
        return super().__iadd__(other)  # type: ignore[return-value]

    def append(self, record: dict) -> None:
        self._changed()
        super().append(record)

    def extend(self, records: Iterable[dict]) -> None:
        self._changed()
        super().extend(records)

    def insert(self, index: SupportsIndex, record: dict) -> None:
        self._changed()
        super().insert(index, record)

    def pop(self, index: SupportsIndex = -1) -> dict:
        self._changed()
        item: dict = super().pop(index)
        return item

    def remove(self, record: dict) -> None:
        self._changed()
        super().remove(record)

    def reverse(self) -> None:
        self._changed()
        super().reverse()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        self._changed()
        super().sort(*args, **kwargs)

    def clear(self) -> None:
        self._changed()
        super().clear()

    @overload
    def __getitem__(self, index: SupportsIndex) -> dict: ...

    @overload
    def __getitem__(self, index: slice) -> PreferenceRecords: ...

    def __getitem__(self, index: SupportsIndex | slice) -> dict | PreferenceRecords:
        if isinstance(index, slice):
            lines = None if self.lines is None else self.lines[index]
            return PreferenceRecords(super().__getitem__(index), self.path, lines)
        item: dict = super().__getitem__(index)
        return item


_ARRAY_FILE = (
    "{path}: a JSON array; preference data files are JSONL, one record a line (convert it with "
    'python -c "import json,sys; [print(json.dumps(r)) for r in json.load(sys.stdin)]" '
    "< in.json > out.jsonl)"
)


def _check_wrapped(record: Mapping[str, Any], path: Path) -> None:
    """A JSON file whose one object holds the records in a list under a key ({"data": [...]}):
    a ValueError naming the key, with a command converting it; it was "missing ['prompt',
    'chosen', 'rejected'] (it has ['data'])"."""
    for key, value in record.items():
        if isinstance(value, list) and value and isinstance(value[0], Mapping):
            if "chosen" in value[0]:
                raise ValueError(
                    f"{path}: one JSON object holding the records in a list under {key!r}; "
                    "preference data files are JSONL, one record a line (convert it with "
                    'python -c "import json,sys; [print(json.dumps(r)) for r in '
                    f'json.load(sys.stdin)[{key!r}]]" < {path.name} > out.jsonl)'
                )


_RECORD_SHAPE = (
    'DPO data must be preference records: {"prompt": ..., "chosen": ..., "rejected": ...} '
    "(strings, or message lists)"
)
_RECORD_FIX = (
    "pass engine.set_dataset() a list of such dicts (or read them from a JSONL file with "
    "chatlearn.hf.data.load_preference_data)"
)


def _check_record(record: Any, where: str, *, in_file: bool = False) -> dict:
    if not isinstance(record, Mapping):
        # a file's line: "pass engine.set_dataset() a list (or read them from a JSONL file with
        # load_preference_data)" told its reader to do what they had done
        fix = _RECORD_FIX if not in_file else "write each line as one such JSON object"
        raise ValueError(
            f"{_RECORD_SHAPE}; {where} is {_short(record)} (a {type(record).__name__}); {fix}"
        )
    record = dict(record)
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" not in record and isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _extract_string_prompt(chosen, rejected)
        if prompt is not None:  # Anthropic HH: "\n\nHuman: ... \n\nAssistant: ..."
            record["prompt"] = prompt
            record["chosen"], record["rejected"] = chosen[len(prompt) :], rejected[len(prompt) :]
    missing = [key for key in ("chosen", "rejected") if key not in record]
    conversational = isinstance(record.get("chosen"), list)
    if "prompt" not in record and not conversational:
        missing.insert(0, "prompt")
    if missing:
        # a file's record is fixed in the file: "pass engine.set_dataset() a list" told its
        # reader to do what they did; a key under another name ("Prompt", "question") is named
        renames = [f"{other!r} to {key!r}" for key in missing if (other := _near_key(record, key))]
        fix = _RECORD_FIX if not in_file else "give every record these keys"
        if renames:
            fix = f"rename {', '.join(renames)}"
        # the record one level down (the Hub's datasets-server rows: {"row_idx", "row": {...}})
        nested = next((k for k, v in record.items() if _holds_a_pair(v)), None)
        if nested is not None:
            fix = f"the record is under {str(nested)!r}: " + (
                f"write that object alone on each line, e.g. jq -c '.[\"{nested}\"]' in.jsonl "
                "> out.jsonl"
                if in_file
                else f"pass each sample's {str(nested)!r} value"
            )
        raise ValueError(
            f"{_RECORD_SHAPE}; {where} is missing {missing} (it has {sorted(map(str, record))}: "
            f"{_short(record)}); {fix}"
        )
    for key in ("prompt", "chosen", "rejected"):
        value = record.get(key, "")
        if not isinstance(value, str | list):
            # str() would train on 'None' or on a dict's repr, silently
            hint = (
                "a single message must be wrapped in a list, [{...}]"
                if isinstance(value, Mapping)
                else "write it as a string or a message list"
            )
            raise ValueError(
                f"{_RECORD_SHAPE}; {where}: {key} is {_short(value)} (a "
                f"{type(value).__name__}): {hint}"
            )
        if isinstance(value, list):
            _check_messages(value, f"{where}: {key}")
    return record


def _holds_a_pair(value: Any) -> bool:
    """Whether ``value`` is a mapping with chosen and rejected keys (a record nested in one)."""
    return isinstance(value, Mapping) and "chosen" in value and "rejected" in value


# other data sets' names of the keys (StackExchange-paired's response_j/k, instruction data's
# question/instruction/query, ShareGPT's conversations)
_KEY_ALIASES = {
    "prompt": ("question", "instruction", "query", "input", "conversations"),
    "chosen": ("response_j", "chosen_response", "preferred", "better"),
    "rejected": ("response_k", "rejected_response", "dispreferred", "worse"),
}


def _near_key(record: Mapping[str, Any], key: str) -> str | None:
    """A key of ``record`` that is most likely ``key`` under another name or spelling."""
    for other in record:
        name = str(other).strip().lower()
        if name in (key, key[: max(4, len(name))]) or name in _KEY_ALIASES[key]:  # "reject"
            return str(other)
    return None


def _check_messages(messages: list, where: str) -> None:
    """A message list of a conversational record: {"role": str, "content": str} each, at least
    one. Anything else failed later in the chat template, without naming the record, or (a
    missing or null content) trained on an empty response."""
    if not messages:
        raise ValueError(f"{where} is an empty message list; give at least one message")
    for i, message in enumerate(messages):
        problem = None
        if not isinstance(message, Mapping):
            problem = f"is {_short(message)} (a {type(message).__name__}), not a message"
        elif not isinstance(message.get("role"), str) or not message["role"]:
            problem = f"has no role ({_short(message)})"
        elif not isinstance(message.get("content"), str | list):  # a list: content parts
            problem = f"has no content ({_short(message)})"
        if problem:
            sharegpt = isinstance(message, Mapping) and {"from", "value"} <= message.keys()
            raise ValueError(
                f"{where}: message {i} {problem}; write each message as "
                '{"role": "user" | "assistant" | ..., "content": "text"}'
                + (" (ShareGPT's from/value: human is user, gpt assistant)" if sharegpt else "")
            )


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_samples(samples: Sequence[Any]) -> str:
    """'4096 samples (all str)' / '3 samples (dict, str)': what build_dataset was given."""
    kinds = sorted({type(sample).__name__ for sample in samples})
    shown = f"all {kinds[0]}" if len(kinds) == 1 else ", ".join(kinds[:4])
    return f"{len(samples)} samples ({shown})"


def _as_messages(value: Any) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return list(value)


def _split_conversation(record: Mapping[str, Any]) -> tuple[list, list, list]:
    """(prompt messages, chosen messages, rejected messages).

    As TRL's `maybe_extract_prompt`: chosen and rejected may be whole conversations that
    already hold the prompt (UltraFeedback, argilla's dpo-mix); their leading messages equal to
    the prompt's are the prompt, not a part of the responses. A response that still holds a
    user turn is an error (it would be trained on)."""
    chosen, rejected = _as_messages(record["chosen"]), _as_messages(record["rejected"])
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise ValueError(f"{key} holds only the prompt's messages: it has no response")
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if users:
            raise ValueError(
                f"{key} has a user turn after the prompt ({_short(messages[users[0]])}): a "
                "response is the assistant's messages only; give chosen/rejected as the whole "
                "conversations starting with the prompt's messages, or as the answers alone"
            )
    return prompt, chosen, rejected


# Anthropic HH's string records: no prompt, both sides the whole dialogue
HH_ASSISTANT = "\n\nAssistant:"


def _extract_string_prompt(chosen: str, rejected: str) -> str | None:
    """The prompt of a string record without one (Anthropic HH): the longest common prefix of
    chosen and rejected, up to and including its last "\n\nAssistant:" (as TRL's
    `extract_prompt`); None when they share no such prefix."""
    end = len(chosen)
    while (end := chosen.rfind(HH_ASSISTANT, 0, end)) >= 0:  # the last turn first
        prompt = chosen[: end + len(HH_ASSISTANT)]
        if rejected.startswith(prompt):  # (a character loop cost 30 µs an HH record)
            return prompt
    return None


def _same_responses(record: Mapping[str, Any]) -> bool:
    """Whether a record's chosen and rejected are the same text (or messages)."""
    chosen, rejected = record["chosen"], record["rejected"]
    if _is_conversational(record):
        return _as_messages(chosen) == _as_messages(rejected)
    return str(chosen) == str(rejected)


def _record_hash(record: Mapping[str, Any]) -> int:
    """A hash of a record's prompt, chosen and rejected as written (message lists by their
    JSON, each message's keys sorted: merged sources write {"content", "role"} in their own
    order, the same message), to count the records that repeat an earlier one."""
    values = (record.get("prompt"), record.get("chosen"), record.get("rejected"))
    return hash(
        tuple(value if isinstance(value, str) else ("json", _json(value)) for value in values)
    )


def _json(value: Any) -> str:
    try:
        return json.dumps(value, default=str, sort_keys=True)
    except TypeError:  # keys that cannot be ordered together (1 and "role", in code): as written
        return json.dumps(value, default=str)


def _repeats(hashes: array) -> tuple[int, int | None]:
    """How many of ``hashes`` (`_record_hash`) repeat an earlier one, and the first repeat's
    index (None when none does)."""
    if not hashes:
        return 0, None
    values, order = torch.sort(torch.frombuffer(hashes, dtype=torch.int64), stable=True)
    # in a stable sort each run of equal hashes keeps its records' order: all but the first
    # of a run repeat it
    repeats = order[1:][values[1:] == values[:-1]]
    return repeats.numel(), (int(repeats.min()) if repeats.numel() else None)


def _blank_response(record: Mapping[str, Any]) -> bool:
    """Whether a record's chosen or rejected is empty or whitespace-only text (a message list:
    every message's text content so)."""

    def blank(value: Any) -> bool:
        if isinstance(value, str):
            return value == "" or value.isspace()
        if isinstance(value, list):
            return all(isinstance(m, Mapping) and blank(m.get("content")) for m in value)
        return False

    if _is_conversational(record):  # the responses without the prompt's messages
        _, chosen, rejected = _split_conversation(record)
        return blank(chosen) or blank(rejected)
    return blank(record["chosen"]) or blank(record["rejected"])


# a prompt at least this long, found at the start of both responses, is taken to be repeated in
# them (a shorter one may begin both answers by chance: "a" in "apple" and "avocado")
MIN_REPEATED_PROMPT_CHARS = 8


def _prompt_in_responses(record: Mapping[str, Any]) -> bool:
    """Whether a string record's chosen and rejected both start with its whole prompt (at least
    `MIN_REPEATED_PROMPT_CHARS` characters of it): HH dialogues or implicit-prompt pairs given
    a prompt key without removing it from the responses, which trained the prompt's text as a
    part of each answer without a word (message lists have such leading messages removed)."""
    if _is_conversational(record):
        return False
    prompt, chosen, rejected = (str(record[key]) for key in ("prompt", "chosen", "rejected"))
    return (
        len(prompt.strip()) >= MIN_REPEATED_PROMPT_CHARS
        and chosen.startswith(prompt)
        and rejected.startswith(prompt)
    )


HH_HUMAN = "\n\nHuman:"


def _turn_in_responses(record: Mapping[str, Any]) -> bool:
    """Whether a string record's chosen or rejected holds a further "\n\nHuman:" turn: HH
    dialogues that differ before their last turn have the prompt extracted up to where they
    part, and the turns after it were trained as the assistant's answer without a word (a
    message list with a user turn in a response is refused)."""
    if _is_conversational(record):
        return False
    skip = len(str(record["prompt"])) if _prompt_in_responses(record) else 0  # said already
    return any(HH_HUMAN in str(record[key])[skip:] for key in ("chosen", "rejected"))


SYSTEM_KEYS = ("system", "system_prompt")


def _unused_system(record: Mapping[str, Any]) -> bool:
    """Whether a record holds a system prompt under a key of its own (Intel/orca_dpo_pairs:
    system, question, chosen, rejected), which no rule here reads: renamed question to prompt
    as the missing-key error says, it trained without its system prompt, without a word."""
    return any(isinstance(record.get(key), str) and record[key].strip() for key in SYSTEM_KEYS)


def _is_conversational(record: Mapping[str, Any]) -> bool:
    return any(isinstance(record.get(key), list) for key in ("prompt", "chosen", "rejected"))


class PairTokenizer:
    """Turns one record into token ids and loss masks under the rules of this module."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        min_prompt_length: int | None = None,
        prompt_template: str = PROMPT_PLACEHOLDER,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if min_prompt_length is None:
            min_prompt_length = max_length // 2
        if not 0 <= min_prompt_length < max_length:
            raise ValueError(
                f"min_prompt_length must be in [0, max_length={max_length}), "
                f"got {min_prompt_length}"
            )
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        if PROMPT_PLACEHOLDER not in prompt_template:
            raise ValueError(
                f"prompt_template must contain {PROMPT_PLACEHOLDER!r}: {prompt_template!r}"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.min_prompt_length = min_prompt_length
        self.prompt_template = prompt_template
        # texts longer than this are cut before they are tokenized (a 50 MB line took 9 GB in
        # the tokenizer, for max_length tokens): twice the characters max_length + 1 tokens of
        # the tokenizer's longest token (at least 8 characters) can cover
        longest = _longest_token(tokenizer)
        self.max_chars = None if longest is None else 2 * (max_length + 1) * max(longest, 8)
        # a post-processor that appends eos (Llama's add_eos_token=True, T5-style) would end
        # every prompt with one: the responses would follow an end of text
        probe = "a"
        plain, special = self._ids(probe), self._ids(probe, special=True)
        eos = tokenizer.eos_token_id
        self._strip_eos = special[-1:] == [eos] and plain[-1:] != [eos]
        # a tokenizer that puts bos before every text: a prompt whose text starts with it too
        # (data exported with its template applied, "<s>[INST] ...") would start with two
        bos = tokenizer.bos_token_id
        self._adds_bos = bos is not None and special[:1] == [bos] and plain[:1] != [bos]

    def encode(
        self, record: Mapping[str, Any], *, cut: bool = True
    ) -> tuple[list[int], list[int], list[int]]:
        """Untruncated (prompt, chosen, rejected) ids; with ``cut``, a text longer than
        `max_chars` is cut first (see `_cut_prompt`), which changes no token truncation keeps."""
        tok = self.tokenizer
        if _is_conversational(record):
            if not has_chat_template(tok):
                raise ValueError(
                    "conversational records (message lists) need a tokenizer with a chat "
                    "template; use string prompt/chosen/rejected with this tokenizer"
                )
            prompt_msgs, chosen_msgs, rejected_msgs = _split_conversation(record)
            if cut and self.max_chars is not None:
                cut_msgs = (
                    [_cut_message(m, self._cut_prompt) for m in prompt_msgs],
                    [_cut_message(m, self._cut_response) for m in chosen_msgs],
                    [_cut_message(m, self._cut_response) for m in rejected_msgs],
                )
                whole = (prompt_msgs, chosen_msgs, rejected_msgs)
                if cut_msgs != whole:
                    encoded = self._render(*cut_msgs)
                    changed = [a != b for a, b in zip(cut_msgs, whole, strict=True)]
                    if self._all_enough(encoded, changed):
                        return encoded
            return self._render(prompt_msgs, chosen_msgs, rejected_msgs)
        texts = [str(record[key]) for key in ("prompt", "chosen", "rejected")]
        if cut and self.max_chars is not None:
            cuts = [self._cut_prompt(texts[0]), *map(self._cut_response, texts[1:])]
            if cuts != texts:
                encoded = self._encode_strings(*cuts)
                if self._all_enough(encoded, [a != b for a, b in zip(cuts, texts, strict=True)]):
                    return encoded
        return self._encode_strings(*texts)

    def _cut_prompt(self, text: str) -> str:
        """The end of a text longer than `max_chars` (a prompt keeps its end)."""
        bound = self.max_chars
        return text if bound is None or len(text) <= bound else text[len(text) - bound :]

    def _cut_response(self, text: str) -> str:
        """The start of a text longer than `max_chars` (a response keeps its start)."""
        bound = self.max_chars
        return text if bound is None or len(text) <= bound else text[:bound]

    def _all_enough(self, encoded: Sequence[Sequence[int]], cut: Sequence[bool]) -> bool:
        """Whether each cut text's ids still run past what truncation keeps (a normalizer that
        folds many characters into one token could make them fewer: then the whole text is
        tokenized after all)."""
        needed = self.max_length + 1
        return all(len(ids) > needed for ids, was in zip(encoded, cut, strict=True) if was)

    def _render(
        self, prompt_msgs: list, chosen_msgs: list, rejected_msgs: list
    ) -> tuple[list[int], list[int], list[int]]:
        """Ids of a conversational record's prompt and responses (untruncated)."""
        tok = self.tokenizer
        prompt_text = tok.apply_chat_template(
            prompt_msgs, tokenize=False, add_generation_prompt=True
        )
        responses = []
        for msgs in (chosen_msgs, rejected_msgs):
            full = tok.apply_chat_template(prompt_msgs + msgs, tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError(
                    "the chat template renders the prompt differently inside the whole "
                    "conversation, so the response cannot be located"
                )
            responses.append(self._ids(full[len(prompt_text) :]))
        return self._ids(prompt_text), responses[0], responses[1]

    def _encode_strings(
        self, prompt: str, chosen: str, rejected: str
    ) -> tuple[list[int], list[int], list[int]]:
        prompt_text = self.prompt_template.replace(PROMPT_PLACEHOLDER, prompt)
        return (
            self._prompt_ids(self._ids(prompt_text, special=True)),
            self._response_ids(self._ids(chosen)),
            self._response_ids(self._ids(rejected)),
        )

    def _ids(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _prompt_ids(self, ids: Sequence[int]) -> list[int]:
        """A string prompt's ids with special tokens, without the eos a tokenizer that appends
        one put at its end, and with one bos where the text started with the bos the tokenizer
        adds."""
        ids = list(ids)
        if self._strip_eos and ids[-1:] == [self.tokenizer.eos_token_id]:
            del ids[-1]
        if self._adds_bos and ids[:2] == [self.tokenizer.bos_token_id] * 2:
            del ids[0]
        return ids

    def _response_ids(self, ids: Sequence[int]) -> list[int]:
        """A string response's ids ending with one eos: appended, unless the text ended with
        it already ("...</s>", data exported with its template applied), which scored and
        taught a second eos after the first."""
        eos = self.tokenizer.eos_token_id
        return list(ids) if ids[-1:] == [eos] else [*ids, eos]

    def truncate(
        self, prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> tuple[list[int], list[int], list[int]]:
        if self.max_prompt_length is not None:
            prompt = self._keep_prompt_end(prompt, self.max_prompt_length)
        longest = max(len(chosen), len(rejected))
        if len(prompt) + longest > self.max_length:
            keep = max(self.max_length - longest, min(len(prompt), self.min_prompt_length))
            prompt = self._keep_prompt_end(prompt, keep)
        room = self.max_length - len(prompt)
        return prompt, chosen[:room], rejected[:room]

    def _keep_prompt_end(self, prompt: list[int], keep: int) -> list[int]:
        """The last ``keep`` tokens of ``prompt``, its leading bos kept whatever ``keep`` is (0
        with ``min_prompt_length: 0``): with no prompt token, nothing comes before a response's
        first token, so it is not scored."""
        if len(prompt) <= keep:
            return prompt
        bos = self.tokenizer.bos_token_id
        if bos is not None and prompt[0] == bos:
            return [bos, *prompt[len(prompt) - max(keep, 1) + 1 :]]
        return prompt[len(prompt) - keep :]

    def encode_many(
        self, records: Sequence[Mapping[str, Any]]
    ) -> list[tuple[list[int], list[int], list[int]]]:
        """`encode` over many records (see `iter_encoded`)."""
        return list(self.iter_encoded(records))

    def iter_encoded(
        self, records: Sequence[Mapping[str, Any]], split: str = ""
    ) -> Iterator[tuple[list[int], list[int], list[int]]]:
        """`encode` of each record, in order; string records go through the tokenizer in batch
        calls of a slice of records (the fast tokenizers' batch path is quicker than a call per
        text, and the tokenizer's output for a whole data set held at once was most of the
        memory of loading it). A record the chat template refuses is a one-line ConfigError
        naming it: "sample i of the <split> data set (...)"."""
        template = self.prompt_template
        refused: tuple[type[Exception], ...] = (ValueError, TypeError, KeyError)
        refused += _template_errors()
        for first in range(0, len(records), _ENCODE_SLICE):
            part = records[first : first + _ENCODE_SLICE]
            plain = [record for record in part if not _is_conversational(record)]
            cut_prompt, cut_response = self._cut_prompt, self._cut_response
            prompts = [
                template.replace(PROMPT_PLACEHOLDER, cut_prompt(str(r["prompt"]))) for r in plain
            ]
            responses = [cut_response(str(r[key])) for r in plain for key in ("chosen", "rejected")]
            prompt_ids = self._ids_of(prompts, special=True) if plain else []
            response_ids = self._ids_of(responses, special=False) if plain else []
            k = 0
            for i, record in enumerate(part, start=first):
                if _is_conversational(record):
                    try:
                        encoded = self.encode(record)
                    except refused as exc:  # the chat template's, a record it cannot render
                        problem = " ".join(str(exc).split()) or type(exc).__name__
                        raise ConfigError(
                            problem,
                            where=f"{sample_where(i, split)} ({_short(record)})",
                            fix="correct that record, or use a tokenizer whose chat template "
                            "renders it (model_args.model_path)",
                        ) from None
                    yield encoded
                    continue
                chosen, rejected = response_ids[2 * k], response_ids[2 * k + 1]
                encoded = (
                    self._prompt_ids(prompt_ids[k]),
                    self._response_ids(chosen),
                    self._response_ids(rejected),
                )
                k += 1
                if self.max_chars is not None:
                    texts = [str(record[key]) for key in ("prompt", "chosen", "rejected")]
                    cut = [len(text) > self.max_chars for text in texts]
                    if any(cut) and not self._all_enough(encoded, cut):
                        encoded = self.encode(record, cut=False)
                yield encoded

    def _ids_of(self, texts: list[str], *, special: bool) -> list[list[int]]:
        """The ids of many texts in one tokenizer call, without the masks and offsets."""
        try:
            out = self.tokenizer(
                texts,
                add_special_tokens=special,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
        except TypeError:  # a tokenizer without those options
            out = self.tokenizer(texts, add_special_tokens=special)
        return list(out["input_ids"])

    def __call__(self, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.to_item(*self.encode(record))

    def to_item(
        self, prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> dict[str, torch.Tensor]:
        """Truncate and build one dataset item (ids and loss masks of both sides)."""
        return self.build_item(*self.truncate(prompt, chosen, rejected))

    @staticmethod
    def build_item(
        prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> dict[str, torch.Tensor]:
        """The dataset item of an already truncated pair."""
        item: dict[str, torch.Tensor] = {}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            item[f"{side}_input_ids"] = torch.tensor(prompt + response, dtype=torch.long)
            mask = torch.zeros(len(prompt) + len(response), dtype=torch.long)
            mask[len(prompt) :] = 1
            item[f"{side}_loss_mask"] = mask
        return item


def _beyond_embeddings(
    tokenizer: Any,
    rows: int,
    kept: Mapping[str, list[int]],
    index: int,
    records: Sequence[Mapping[str, Any]],
    split: str,
) -> ConfigError:
    """The error of pair ``index``, whose ``kept`` ids hold one beyond the model's ``rows``."""
    key, token_id = next((k, i) for k, ids in kept.items() for i in ids if i >= rows)
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    token = convert(token_id) if callable(convert) else None
    return ConfigError(
        f"its {key} tokenizes to id {token_id} ({token!r}), beyond the {rows} rows of the "
        "model's input embeddings (a token added to the tokenizer, in the text or the chat "
        "template, that the model's embeddings were never resized for)",
        where=f"{sample_where(index, split)} ({_short(records[index])})",
        fix="remove that token from the record, or resize the model's embeddings to its "
        "tokenizer and save it (model.resize_token_embeddings(len(tokenizer)); "
        "model.save_pretrained(path))",
    )


def _longest_token(tokenizer: Any) -> int | None:
    """The characters of the tokenizer's longest vocabulary entry (a byte-level or
    SentencePiece entry has at least as many characters as the text it stands for), or None
    when the tokenizer does not list its vocabulary."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    try:
        vocab = get_vocab() if callable(get_vocab) else None
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return max(map(len, vocab), default=None) if vocab else None


def _cut_message(message: Mapping[str, Any], cut: Any) -> Mapping[str, Any]:
    """``message`` with its text content passed through ``cut`` (other content as it is)."""
    content = message.get("content")
    if not isinstance(content, str) or cut(content) is content:
        return message
    return {**message, "content": cut(content)}


def _template_errors() -> tuple[type[Exception], ...]:
    """jinja2's error type (a chat template's raise_exception, a syntax error), if installed."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - transformers' chat templates need it
        return ()
    return (TemplateError,)


_ENCODE_SLICE = 4096  # records tokenized per call by `PairTokenizer.encode_many`


class PreferenceCollator:
    """Pads a list of tokenized pairs into the DPO batch (right padding)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty list of pairs")
        batch: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            ids = [item[f"{side}_input_ids"] for item in items]
            length = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(ids), length), dtype=torch.long)
            loss_mask = torch.zeros((len(ids), length), dtype=torch.long)
            for row, item in enumerate(items):
                n = len(ids[row])
                input_ids[row, :n] = ids[row]
                attention[row, :n] = 1
                loss_mask[row, :n] = item[f"{side}_loss_mask"]
            batch[f"{side}_input_ids"] = input_ids
            batch[f"{side}_attention_mask"] = attention
            batch[f"{side}_loss_mask"] = loss_mask
        return batch


class PreferenceDataset(Dataset):
    """Tokenized preference pairs (tokenized once, up front) with a `collate_fn` for DPO batches.

    `max_length` counts prompt + response tokens of one side; see the module docstring for the
    truncation rules. The pairs are kept as one array of 32-bit token ids (each pair's prompt,
    chosen and rejected tokens once) and each item's tensors are made when it is read: four
    int64 tensors per pair, the prompt in two of them, took 5-10 times the memory, in every
    replica and trainer rank that builds the data set.

    With `embedding_rows` (the rows of the model's input embeddings), a pair whose kept ids
    reach beyond them is a one-line ConfigError naming it ("sample i of the <split> data set"):
    an added token in its text (or the chat template's) that the model's embeddings were never
    resized for failed the first forward with an IndexError that named no record.
    """

    def __init__(
        self,
        records: str | Path | Iterable[Mapping[str, Any]],
        tokenizer: Any,
        *,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        min_prompt_length: int | None = None,
        prompt_template: str = PROMPT_PLACEHOLDER,
        split: str = "",
        embedding_rows: int | None = None,
    ) -> None:
        self.pair_tokenizer = PairTokenizer(
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            min_prompt_length=min_prompt_length,
            prompt_template=prompt_template,
        )
        tokens = array("i")  # every pair's prompt, chosen and rejected ids, one after another
        spans = array("q")  # per pair: its first token in `tokens`, prompt, chosen, rejected
        # what max_length cut: pairs whose prompt lost tokens, pairs whose responses did
        self.num_truncated_prompts = self.num_truncated_responses = 0
        # pairs with no prompt token at all (an empty prompt, a tokenizer that adds no bos): no
        # token comes before the responses' first, so it is not scored; of them, those whose
        # prompt max_length cut to nothing (min_prompt_length 0, no leading bos to keep)
        self.num_empty_prompts = self.num_prompts_cut_away = self.num_identical = 0
        # of the identical pairs, those identical in the data already (not max_length's doing)
        self.num_identical_in_data = 0
        # pairs with a response of no token (a chat template that renders nothing for it): its
        # log-prob is 0 whatever the model, all its loss mask zeros
        self.num_empty_responses = 0
        # pairs with an empty or whitespace-only chosen or rejected text (of tokens: eos alone)
        self.num_blank_responses = 0
        # string pairs whose chosen and rejected both start with the prompt's whole text (a
        # data set that kept the prompt in its responses): the prompt is trained as a response
        self.num_prompt_in_responses = 0
        # string pairs with a "\n\nHuman:" turn inside a response (Anthropic HH dialogues that
        # differ before their last turn): the model is taught to write the human's turns
        self.num_turns_in_responses = 0
        # records with a system prompt under a key of its own (Intel/orca_dpo_pairs' "system"),
        # which nothing reads: trained without it
        self.num_unused_system = 0
        # each record's hash (8 bytes a pair; a set of them took 10 times that), to count the
        # records that repeat an earlier one: kept, they weigh their pair once more each
        hashes = array("q")
        # chat-format records (message lists): their prompt is the chat template's rendering,
        # `prompt_template` is not applied to them; how many, and the first one's index
        self.num_chat_records, self.first_chat_record = 0, None
        # of each kind of pair the summary counts, the first one's index, which it names: "4
        # have an empty ... text" left the user to search the data for them
        self.first_samples: dict[str, int] = {}
        first = self.first_samples
        pairs = self.pair_tokenizer
        loaded = load_preference_data(records)
        for index, (prompt, chosen, rejected) in enumerate(pairs.iter_encoded(loaded, split)):
            kept_prompt, kept_chosen, kept_rejected = pairs.truncate(prompt, chosen, rejected)
            in_data = False  # identical in the data itself, not by max_length's cut
            if kept_chosen == kept_rejected and chosen == rejected:
                # ids of texts cut before tokenizing (PairTokenizer.max_chars) may differ later
                cut = len(chosen) > pairs.max_length + 1
                in_data = not cut or _same_responses(loaded[index])
                self.num_identical_in_data += in_data
            if kept_chosen == kept_rejected:
                first.setdefault("identical_in_data" if in_data else "made_identical", index)
            self.num_empty_prompts += not kept_prompt
            self.num_prompts_cut_away += bool(prompt) and not kept_prompt
            if not kept_prompt:
                first.setdefault("prompt_cut_away" if prompt else "empty_prompt", index)
            no_token = not (kept_chosen and kept_rejected)
            blank = not no_token and _blank_response(loaded[index])
            self.num_empty_responses += no_token
            self.num_blank_responses += blank
            if no_token or blank:
                first.setdefault("no_token" if no_token else "blank", index)
            if _prompt_in_responses(loaded[index]):
                self.num_prompt_in_responses += 1
                first.setdefault("prompt_in_responses", index)
            if _turn_in_responses(loaded[index]):
                self.num_turns_in_responses += 1
                first.setdefault("turn_in_responses", index)
            if _unused_system(loaded[index]):
                self.num_unused_system += 1
                first.setdefault("unused_system", index)
            self.num_truncated_prompts += len(kept_prompt) < len(prompt)
            self.num_truncated_responses += len(kept_chosen) < len(chosen) or len(
                kept_rejected
            ) < len(rejected)
            self.num_identical += kept_chosen == kept_rejected
            hashes.append(_record_hash(loaded[index]))
            if _is_conversational(loaded[index]):
                self.num_chat_records += 1
                if self.first_chat_record is None:
                    self.first_chat_record = index
            spans.extend((len(tokens), len(kept_prompt), len(kept_chosen), len(kept_rejected)))
            ids = kept_prompt + kept_chosen + kept_rejected
            if embedding_rows is not None and ids and max(ids) >= embedding_rows:
                kept = {"prompt": kept_prompt, "chosen": kept_chosen, "rejected": kept_rejected}
                raise _beyond_embeddings(tokenizer, embedding_rows, kept, index, loaded, split)
            try:
                tokens.extend(ids)
            except OverflowError:
                raise ValueError(
                    f"pair {len(spans) // 4 - 1} has a token id beyond 2**31 (the tokenizer's "
                    "vocabulary is not that large: check it)"
                ) from None
        # records that repeat an earlier one (the same prompt, chosen and rejected)
        self.num_duplicates, first_repeat = _repeats(hashes)
        if first_repeat is not None:
            first["repeat"] = first_repeat
        if not tokens:
            tokens.append(0)  # frombuffer refuses an empty buffer; no span refers to it
        self._tokens = torch.frombuffer(tokens, dtype=torch.int32)  # a view: no copy
        self._token_store, self._spans = tokens, spans  # the buffer _tokens views
        self.collate_fn = PreferenceCollator(tokenizer.pad_token_id)

    def truncation_summary(self) -> str | None:
        """One line on what ``max_length`` cut, which pairs it made identical (their DPO
        gradient is zero), which were identical in the data already, which have no prompt
        token, which a response of no token and which repeat an earlier record; None when
        there is none of that."""
        cut = self.num_truncated_prompts or self.num_truncated_responses
        made_identical = self.num_identical - self.num_identical_in_data
        empty = self.num_empty_responses or self.num_blank_responses
        repeated = (
            self.num_duplicates
            or self.num_prompt_in_responses
            or self.num_turns_in_responses
            or self.num_unused_system
        )
        if not (cut or self.num_identical or self.num_empty_prompts or empty or repeated):
            return None
        parts = []
        if cut or made_identical:
            # naming max_length alone blamed it for what max_prompt_length cut
            bound = self.pair_tokenizer.max_prompt_length
            limits = "" if bound is None else f" and max_prompt_length {bound}"
            parts.append(
                f"{self.num_truncated_prompts} lost prompt tokens and "
                f"{self.num_truncated_responses} lost response tokens to max_length "
                f"{self.pair_tokenizer.max_length}{limits}"
            )
        empty_in_data = self.num_empty_prompts - self.num_prompts_cut_away
        if empty_in_data:
            parts.append(
                f"{empty_in_data} have no prompt token (an empty prompt and a tokenizer that adds "
                "no bos): the first token of their responses is not scored"
                + self._first("empty_prompt")
            )
        if self.num_prompts_cut_away:
            parts.append(
                f"{self.num_prompts_cut_away} lost every prompt token to max_length "
                "(min_prompt_length 0, and no leading bos to keep): the first token of their "
                "responses is not scored; set min_prompt_length above 0"
                + self._first("prompt_cut_away")
            )
        if self.num_empty_responses:
            parts.append(
                f"{self.num_empty_responses} have a response of no token (the chat template "
                "renders nothing for it, e.g. empty content): its log-prob is 0 whatever the "
                "model, so only the other response is trained; fix the data or the template"
                + self._first("no_token")
            )
        if self.num_blank_responses:
            parts.append(
                f"{self.num_blank_responses} have an empty or whitespace-only chosen or rejected "
                "text in the data: it scores as an answer of nothing (eos alone), which a "
                "chosen one teaches; drop or fix those records" + self._first("blank")
            )
        if self.num_prompt_in_responses:
            parts.append(
                f"{self.num_prompt_in_responses} have chosen and rejected texts that both start "
                "with the whole prompt (the prompt kept in the responses?): it is trained as a "
                "part of each answer; remove it from chosen and rejected, or leave out the "
                "prompt key of Anthropic HH dialogues (it is then extracted)"
                + self._first("prompt_in_responses")
            )
        if self.num_turns_in_responses:
            parts.append(
                f"{self.num_turns_in_responses} have a '\\n\\nHuman:' turn inside chosen or "
                "rejected (Anthropic HH dialogues that differ before their last turn): the "
                "model is taught to write the human's turns; drop those records, or cut their "
                "responses before it" + self._first("turn_in_responses")
            )
        if self.num_unused_system:
            parts.append(
                f"{self.num_unused_system} have a system prompt under a key of its own "
                f"({' or '.join(SYSTEM_KEYS)}), which is not read: they train without it; put "
                "it into the prompt (a system message first in a message list, or the prompt's "
                "text)" + self._first("unused_system")
            )
        if made_identical:
            parts.append(
                f"{made_identical} have identical responses after it (no DPO gradient: they "
                "only dilute the batch); raise max_length or max_prompt_length's share"
                + self._first("made_identical")
            )
        if self.num_identical_in_data:
            parts.append(
                f"{self.num_identical_in_data} have identical chosen and rejected responses in "
                "the data itself (no DPO gradient: they only dilute the batch; drop them from "
                "the data)" + self._first("identical_in_data")
            )
        if self.num_duplicates:
            parts.append(
                f"{self.num_duplicates} repeat an earlier record (the same prompt, chosen and "
                "rejected): kept, so such a pair is trained as often as it occurs; deduplicate "
                "the data if that is not meant" + self._first("repeat")
            )
        return f"of {len(self)} pairs, " + "; ".join(parts)

    def _first(self, kind: str) -> str:
        """The summary's note of the first pair of ``kind`` (`first_samples`), or ""."""
        index = self.first_samples.get(kind)
        return "" if index is None else f" (the first: sample {index})"

    def __len__(self) -> int:
        return len(self._spans) // 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Pair `index`: `chosen_input_ids`, `chosen_loss_mask`, `rejected_input_ids`,
        `rejected_loss_mask` (int64; each side is the prompt's ids then the response's)."""
        index = range(len(self))[index]  # negative indices; an IndexError past the end
        first, prompt, chosen, rejected = self._spans[4 * index : 4 * index + 4]
        pair = self._tokens[first : first + prompt + chosen + rejected].long()
        mask = torch.ones(prompt + max(chosen, rejected), dtype=torch.long)
        mask[:prompt] = 0
        return {
            "chosen_input_ids": pair[: prompt + chosen],
            "chosen_loss_mask": mask[: prompt + chosen],
            "rejected_input_ids": torch.cat((pair[:prompt], pair[prompt + chosen :])),
            "rejected_loss_mask": mask[: prompt + rejected],
        }
