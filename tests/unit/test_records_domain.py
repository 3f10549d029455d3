"""The records projections on a dict-backed ViewWriter, and parse_filter."""

import copy
from typing import Any

import pytest

from cqrskit.domains.records import Records, Statistics, parse_filter
from cqrskit.errors import InvalidRequest, NotFound
from cqrskit.messages import Envelope


class DictViews:
    """A ViewWriter over dicts. It copies on the way in and out, so a projection that
    changes a document in place without `put` loses the change, as it should."""

    def __init__(self) -> None:
        self.collections: dict[str, dict[str, dict[str, Any]]] = {}

    def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        doc = self.collections.get(collection, {}).get(doc_id)
        return copy.deepcopy(doc)

    def put(self, collection: str, doc_id: str, doc: dict[str, Any]) -> None:
        self.collections.setdefault(collection, {})[doc_id] = copy.deepcopy(doc)

    def delete(self, collection: str, doc_id: str) -> None:
        self.collections.get(collection, {}).pop(doc_id, None)


class Log:
    """Builds envelopes the way the store would: positions and versions in order."""

    def __init__(self) -> None:
        self.position = 0
        self.versions: dict[str, int] = {}

    def event(
        self, stream_id: str, type_name: str, data: dict[str, Any], at: str
    ) -> Envelope:
        self.position += 1
        version = self.versions[stream_id] = self.versions.get(stream_id, 0) + 1
        return Envelope(
            event_id=f"e-{self.position}", stream_id=stream_id, stream_type="record",
            version=version, position=self.position, type=type_name, schema_version=1,
            data=data, metadata={"command_id": f"c-{self.position}"}, recorded_at=at,
        )


DAY1 = "2024-05-01T10:00:00.000001+00:00"
DAY1_LATER = "2024-05-01T23:59:59+00:00"
DAY2 = "2024-05-02T00:00:00+00:00"


def apply_all(
    projection: Records | Statistics, views: DictViews, envelopes: list[Envelope]
) -> None:
    for envelope in envelopes:
        projection.apply(envelope, views)


def test_records_projection_inserts_updates_and_deletes_documents() -> None:
    log, views = Log(), DictViews()
    apply_all(Records(), views, [
        log.event("r-1", "RecordInserted", {"data": {"color": "red"}}, DAY1),
        log.event("r-2", "RecordInserted", {"data": {"n": 1}}, DAY1),
        log.event("r-1", "RecordUpdated", {"data": {"color": "blue", "n": 2}}, DAY2),
        log.event("r-2", "RecordDeleted", {}, DAY2),
    ])
    assert views.collections == {"records": {"r-1": {
        "id": "r-1", "data": {"color": "blue", "n": 2}, "version": 2,
        "created_at": DAY1, "updated_at": DAY2,
    }}}


def test_records_projection_replaces_data_on_update() -> None:
    log, views = Log(), DictViews()
    apply_all(Records(), views, [
        log.event("r-1", "RecordInserted", {"data": {"a": 1, "b": 2}}, DAY1),
        log.event("r-1", "RecordUpdated", {"data": {"c": 3}}, DAY1_LATER),
        log.event("r-1", "RecordUpdated", {"data": {}}, DAY2),
    ])
    doc = views.collections["records"]["r-1"]
    assert (doc["data"], doc["version"], doc["updated_at"]) == ({}, 3, DAY2)


def test_records_projection_fails_on_an_update_of_a_record_not_in_the_view() -> None:
    log, views = Log(), DictViews()
    with pytest.raises(NotFound, match="not in the view"):
        Records().apply(log.event("r-9", "RecordUpdated", {"data": {}}, DAY1), views)
    assert views.collections == {}


def test_records_projection_ignores_events_it_does_not_handle() -> None:
    log, views = Log(), DictViews()
    Records().apply(log.event("r-1", "SomethingElse", {"x": 1}, DAY1), views)
    assert views.collections == {}


def test_statistics_count_by_type_in_total_and_per_day() -> None:
    log, views = Log(), DictViews()
    apply_all(Statistics(), views, [
        log.event("r-1", "RecordInserted", {"data": {}}, DAY1),
        log.event("r-2", "RecordInserted", {"data": {}}, DAY1),
        log.event("r-1", "RecordUpdated", {"data": {}}, DAY1_LATER),
        log.event("r-1", "RecordUpdated", {"data": {}}, DAY2),
        log.event("r-2", "RecordDeleted", {}, DAY2),
        log.event("r-3", "RecordInserted", {"data": {}}, DAY2),
    ])
    assert views.collections["stats_totals"] == {"all": {
        "total": 6, "by_type": {"RecordInserted": 3, "RecordUpdated": 2, "RecordDeleted": 1},
    }}
    assert views.collections["stats_by_day"] == {
        "2024-05-01": {
            "day": "2024-05-01", "total": 3,
            "by_type": {"RecordInserted": 2, "RecordUpdated": 1},
        },
        "2024-05-02": {
            "day": "2024-05-02", "total": 3,
            "by_type": {"RecordUpdated": 1, "RecordDeleted": 1, "RecordInserted": 1},
        },
    }


def test_statistics_ignore_events_of_other_types() -> None:
    log, views = Log(), DictViews()
    Statistics().apply(log.event("r-1", "SomethingElse", {}, DAY1), views)
    assert views.collections == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("color:red", ("data.color", "red")),
        ('color:"red"', ("data.color", "red")),
        ("size:3", ("data.size", 3)),
        ('size:"3"', ("data.size", "3")),
        ("ratio:2.5", ("data.ratio", 2.5)),
        ("ok:true", ("data.ok", True)),
        ("ok:false", ("data.ok", False)),
        ("gone:null", ("data.gone", None)),
        ("url:http://x:80/", ("data.url", "http://x:80/")),
        ("empty:", ("data.empty", "")),
        ("nested.field:x", ("data.nested.field", "x")),
        ("word:True", ("data.word", "True")),
    ],
)
def test_parse_filter_reads_json_values_and_bare_strings(
    text: str, expected: tuple[str, Any]
) -> None:
    field, value = parse_filter(text)
    assert (field, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["color", ":red", "", ":"])
def test_parse_filter_rejects_a_filter_without_field_and_colon(text: str) -> None:
    with pytest.raises(InvalidRequest, match="must look like field:value"):
        parse_filter(text)


@pytest.mark.parametrize("text", ["tags:[1,2]", 'obj:{"a":1}', "tags:[]"])
def test_parse_filter_rejects_non_scalar_values(text: str) -> None:
    with pytest.raises(InvalidRequest, match="must compare with a string, number"):
        parse_filter(text)
