"""The service-facing request objects."""

from esb.service.base import Headers


def test_request_headers_are_looked_up_in_any_case():
    headers = Headers({"X-API-KEY": "k", "CONTENT-TYPE": "application/json"})
    assert headers["x-api-key"] == headers.get("X-Api-Key") == "k"
    assert "content-type" in headers and "missing" not in headers
    assert len(headers) == 2 and set(headers) == {"X-API-KEY", "CONTENT-TYPE"}
