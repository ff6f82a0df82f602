"""The simulator misbehaves as asked: each fault kind, at its rate, replayable."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
from click.testing import CliRunner

from etl.cli import main
from etl.faults import KINDS, Faults
from etl.simulator import Simulator

pytestmark = pytest.mark.timeout(60)

TOKEN = "sim-token"


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # loopback only, whatever proxy is set
        yield session


def ask(http: requests.Session, simulator: Simulator, url: str, page: int = 1) -> str:
    """One request; what came back, in a word or two."""
    user_id = simulator.main_user_ids()[0]
    try:
        response = http.get(
            f"{url}/agent-api/user/{user_id}/task",
            params={"page": page, "per_page": 5},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=(2, 0.3),
        )
    except requests.Timeout:
        return "timeout"
    except requests.RequestException as exc:
        return "timeout" if "timed out" in str(exc) else "broken"
    try:
        body = json.loads(response.content)
    except ValueError:
        return f"{response.status_code} not-json"
    return f"{response.status_code} code {body['code']}"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        pytest.param("throttle", {"429 code 429"}, id="throttle"),
        pytest.param("server_error", {"500 code 500", "502 not-json", "503 not-json"}),
        pytest.param("reset", {"broken"}, id="reset"),
        pytest.param("truncated", {"200 not-json"}, id="truncated"),
        pytest.param(
            "bad_code",
            {"200 code 500", "200 code 503", "200 code 401", "200 code 10001"},
            id="bad_code",
        ),
        pytest.param("unauthorized", {"401 code 401"}, id="unauthorized"),
        pytest.param("stall", {"timeout"}, id="stall"),
    ],
)
def test_each_fault_kind_breaks_the_answer_its_way(
    http: requests.Session, kind: str, expected: set[str]
) -> None:
    faults = Faults(**{kind: 1.0}, seed=2, stall_seconds=0.6)
    simulator = Simulator(main_accounts=1, sub_accounts=0, faults=faults)

    with simulator.serve() as server:
        seen = {ask(http, simulator, server.url, page) for page in range(1, 13)}

    assert seen == expected
    assert simulator.fault_counts() == {kind: 12}


def test_a_429_says_how_long_to_wait(http: requests.Session) -> None:
    simulator = Simulator(faults=Faults(throttle=1.0, retry_after=7))
    user_id = simulator.main_user_ids()[0]

    with simulator.serve() as server:
        response = http.get(
            f"{server.url}/agent-api/user/{user_id}/task",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )

    assert (response.status_code, response.headers["Retry-After"]) == (429, "7")


def test_the_refused_token_is_one_accounts_only(http: requests.Session) -> None:
    plain = Simulator(main_accounts=2, sub_accounts=0)
    refused, other = plain.main_user_ids()
    faults = Faults(unauthorized=1.0, refused_user_id=refused)
    simulator = Simulator(main_accounts=2, sub_accounts=0, faults=faults)

    with simulator.serve() as server:
        answers = [
            http.get(
                f"{server.url}/agent-api/user/{user_id}/task",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=5,
            ).status_code
            for user_id in (refused, other)
        ]

    assert answers == [401, 200]


def faults_met(seed: int, order: list[int]) -> list[tuple[int, str]]:
    """The fault each request met, asked in `order`, as (page, kind)."""
    faults = Faults(throttle=0.2, server_error=0.2, truncated=0.2, seed=seed)
    recorded = Simulator(
        main_accounts=1, sub_accounts=0, faults=faults, record_requests=True
    )
    with recorded.serve() as server, requests.Session() as http:
        http.trust_env = False
        for page in order:
            ask(http, recorded, server.url, page)
    return sorted((s.page or 0, s.fault or "") for s in recorded.take_served())


def test_the_same_seed_meets_the_same_faults_whatever_the_order() -> None:
    forward = list(range(1, 9)) * 3
    backward = forward[::-1]

    first = faults_met(5, forward)

    assert first == faults_met(5, backward)
    assert first != faults_met(6, forward)
    assert {kind for _, kind in first} > {""}


def test_rates_are_shares_of_requests(http: requests.Session) -> None:
    faults = Faults(server_error=0.25, truncated=0.25, seed=1)
    simulator = Simulator(main_accounts=1, sub_accounts=0, faults=faults)

    with simulator.serve() as server:
        for page in range(1, 401):
            ask(http, simulator, server.url, page)

    counts = simulator.fault_counts()
    assert 70 <= counts["server_error"] <= 130
    assert 70 <= counts["truncated"] <= 130


def test_no_faults_leave_the_answers_alone(http: requests.Session) -> None:
    simulator = Simulator(main_accounts=1, sub_accounts=0, faults=Faults(seed=9))

    with simulator.serve() as server:
        seen = {ask(http, simulator, server.url, page) for page in range(1, 6)}

    assert seen == {"200 code 200"}
    assert simulator.fault_counts() == {}


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        pytest.param(["nope=0.1"], "not KIND=RATE", id="unknown-kind"),
        pytest.param(["reset"], "not KIND=RATE", id="no-rate"),
        pytest.param(["reset=x"], "not a number", id="rate-not-number"),
        pytest.param(["reset=1.5"], "not between 0 and 1", id="rate-above-1"),
        pytest.param(["reset=0.6", "stall=0.6"], "more than 1", id="sum-above-1"),
    ],
)
def test_fault_options_are_checked(given: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Faults.parse(given)


def test_fault_options_parse_every_kind() -> None:
    faults = Faults.parse([f"{kind.replace('_', '-')}=0.1" for kind in KINDS], seed=4)

    assert faults.rates() == dict.fromkeys(KINDS, 0.1)
    assert faults.describe().endswith("(seed 4)")


def test_simulate_refuses_a_bad_fault_option() -> None:
    result = CliRunner().invoke(main, ["simulate", "--fault", "reset=2"])

    assert result.exit_code == 2
    assert "Invalid value for --fault: fault rate reset=2.0 is not between" in (
        result.stderr
    )
