"""The API server parses HTTP with httptools (uvicorn's choice when it is installed), which took
10-20% less API-server CPU per streamed token than h11 on the CI machine (benchmarks/api_overhead.sh,
docs/benchmarks.md)."""
import uvicorn


def test_uvicorn_picks_httptools():
    config = uvicorn.Config(lambda scope, receive, send: None, http="auto")  # the default, which `meshserve serve` keeps
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol", config.http_protocol_class
