"""The data pipeline's checks at its boundary, in-process: timestamp formats across batches, the spec's fields."""
from __future__ import annotations

import pandas as pd
import pytest

from models import events as ev
from models.errors import DataError
from models.events import iter_events


def test_formats_mixed_across_batches_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # each batch alone is one format; together they are not
    frame = pd.DataFrame({"id": ["a", "a", "b", "b"], "event_type": "connect", "event_value": 1.0,
                          "timestamp": ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", "1704240000", "1704326400"]})
    monkeypatch.setattr(ev, "BATCH_ROWS", 2)
    with pytest.raises(DataError, match=r"^the DataFrame: column 'timestamp' has mixed formats: row 3 is '1704240000' "
                                        r"\(unix seconds\), row 1 is '2024-01-01T00:00:00Z' \(ISO 8601\); "
                                        r"write every timestamp one way$"):
        list(iter_events(frame))
    one_way = frame.assign(timestamp=["1704067200", "1704153600", "1704240000", "1704326400"])
    assert [b.ts_s.tolist() for b in iter_events(one_way)] == [[1704067200, 1704153600], [1704240000, 1704326400]]


def test_a_directory_is_not_an_event_log(tmp_path) -> None:
    with pytest.raises(DataError, match="is a directory; pass the path of one CSV or Parquet event log"):
        list(iter_events(tmp_path))


@pytest.mark.parametrize("text", ["03/31/2024", "2024/03/31", "31-03-2024", "2024-03", "today", "1711843200"])
def test_cutoff_must_be_iso(text: str) -> None:
    from models.prepare import parse_cutoff

    with pytest.raises(DataError, match=f"--cutoff '{text}': not an ISO date; use YYYY-MM-DD"):
        parse_cutoff(text)
