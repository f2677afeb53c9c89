"""Convert Experiences requests: the seed's tracking GET ("track") or the batched v1 POST ("v1"), per project.

One conversion is all goals of one experiment-variation for one visitor.

- track: `GET {base}/track/?c=&p=&e={exp}-{var}&g={goal,goal}&ga={n}&t={goal.goal}|{tx}|{value}|{count}&vi=`,
  one request per conversion. Every part is percent-encoded on its own (`quote(safe="")`) and the
  parts are joined with the format's separators: `,` between goals and `.` between transaction
  goals stay literal (both are legal in a query); `|` is not legal in a URI query (RFC 3986), so it is
  sent as `%7C`. A server decoding the query sees `t=100|TX1|23.50|3` either way.
- The transaction id in `t` is `transaction_id(order_id)`: the order id with `%` written `%25` and `|`
  written `%7C`, nothing else changed (so `ORD-1` stays `ORD-1`, `A|B` becomes `A%7CB`). Seed 002
  documents `t` as four `|`-separated parts and no escape for a `|` inside one; a server that splits
  `t` on every `|` (inferred: the seed's wording, nothing else, says how it parses) would read an
  order id containing `|` as more than four parts and refuse or misread the call. With the escape,
  `t` always has exactly four parts. The mapping is deterministic and injective (`%` is escaped too,
  so `order_id_of` inverts it: an operator can map a Convert transaction back to its order).
- v1: `POST {base}/v1/track/{account}/{project}`, JSON with one `visitors[]` entry per conversion and
  one event per goal; many conversions share a body. `transactionId` is a JSON string, which carries
  any text: there it is the order id unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import quote

from consumer.config import BatchConfig
from consumer.model import Conversion, Provider
from consumer.providers.base import HttpRequest, Outcome, Route, json_number, json_string
from consumer.providers.convert.classify import classify
from consumer.providers.convert.config import CONVERT, ConvertConfig, ConvertProject

_CENT = Decimal("0.01")


# `transaction_id`'s two escapes: `t`'s separator, and the escape character itself (which keeps it injective).
_ESCAPED = re.compile(r"%(?:25|7C)")
_UNESCAPES = {"%25": "%", "%7C": "|"}


def transaction_id(order_id: str) -> str:
    """The transaction id `t` carries for an order: `%` -> `%25`, `|` -> `%7C`, everything else as it is."""
    if "%" not in order_id and "|" not in order_id:
        return order_id  # the usual order id: sent unchanged, without building a new string
    return order_id.replace("%", "%25").replace("|", "%7C")


def order_id_of(tx: str) -> str:
    """The order id a tracking call's transaction id was made from (the inverse of `transaction_id`).

    Raises ValueError for a text `transaction_id` cannot produce: a `|`, or a `%` not starting `%25`/`%7C`.
    """
    if "|" in tx or tx.count("%") != len(_ESCAPED.findall(tx)):
        raise ValueError(f"not a transaction id made by transaction_id(): {tx!r}")
    return _ESCAPED.sub(lambda m: _UNESCAPES[m.group(0)], tx)


def amount(revenue: Decimal) -> str:
    """A transaction value with exactly two decimals, rounded half up (2.675 -> "2.68"); no float."""
    return json_number(revenue.quantize(_CENT, rounding=ROUND_HALF_UP))


def _q(value: str) -> str:
    """One query part, percent-encoded as UTF-8 (a lone surrogate passes instead of raising)."""
    return quote(value, safe="", errors="surrogatepass")


def _exposure(conversion: Conversion) -> tuple[str, str]:
    if conversion.experiment_id is None or conversion.variation_id is None:
        raise ValueError("a Convert conversion needs experiment_id and variation_id")
    return conversion.experiment_id, conversion.variation_id


def _sends_transaction(conversion: Conversion) -> bool:
    return bool(conversion.transaction_goals) and conversion.revenue is not None


def track_url(p: ConvertProject, conversion: Conversion) -> str:
    """The tracking GET for one conversion (seed 002), every value percent-encoded."""
    exp, var = _exposure(conversion)
    query = [f"c={_q(p.account_id)}", f"p={_q(p.project_id)}", f"e={_q(exp)}-{_q(var)}"]
    if conversion.goals:
        query += [f"g={','.join(_q(g) for g in conversion.goals)}", f"ga={len(conversion.goals)}"]
    if _sends_transaction(conversion):
        assert conversion.revenue is not None
        t = [
            ".".join(_q(g) for g in conversion.transaction_goals),
            _q(transaction_id(conversion.order_id)),
            amount(conversion.revenue),
            str(conversion.item_count),
        ]
        query.append("t=" + "%7C".join(t))
    # The seed has no visitor parameter (it counts the conversion for the experiment-variation);
    # sending the visitor as `vi` is our choice, so the provider sandbox can record who converted.
    query.append(f"vi={_q(conversion.visitor_id)}")
    return f"{p.base_url}/track/?" + "&".join(query)


def _event_json(goal: str, conversion: Conversion, exp: str, var: str) -> str:
    parts = ['{"eventType":"conversion","data":{"goalId":', str(int(goal))]
    if conversion.revenue is not None and goal in conversion.transaction_goals:
        parts += [
            ',"goalData":[{"key":"amount","value":',
            amount(conversion.revenue),
            '},{"key":"productsCount","value":',
            str(conversion.item_count),
            '},{"key":"transactionId","value":',
            json_string(conversion.order_id),
            "}]",
        ]
    parts += [',"bucketingData":{', json_string(exp), ":", json_string(var), "}}}"]
    return "".join(parts)


def visitor_json(conversion: Conversion) -> str:
    """One v1 `visitors[]` entry: the visitor and one conversion event per goal."""
    exp, var = _exposure(conversion)
    events = ",".join(_event_json(g, conversion, exp, var) for g in conversion.goals)
    return '{"visitorId":' + json_string(conversion.visitor_id) + ',"events":[' + events + "]}"


def v1_body(p: ConvertProject, conversions: Sequence[Conversion]) -> bytes:
    head = '{"accountId":' + json_string(p.account_id) + ',"projectId":' + json_string(p.project_id)
    return (head + ',"visitors":[' + ",".join(visitor_json(c) for c in conversions) + "]}").encode()


class ConvertModule:
    provider: Provider = CONVERT

    def __init__(self, cfg: ConvertConfig) -> None:
        self._cfg = cfg
        # The tracking GET carries one conversion: never wait to fill a batch.
        self._single = BatchConfig(max_events=1, max_bytes=cfg.batch.max_bytes, linger=0.0)

    def __repr__(self) -> str:
        return f"ConvertModule(projects={sorted(self._cfg.projects)})"

    def _project(self, key: str) -> ConvertProject:
        try:
            return self._cfg.projects[key]
        except KeyError:
            raise ValueError(f"unknown Convert project {key!r}") from None

    def route(self, conversion: Conversion) -> Route:
        p = self._project(conversion.project)
        _exposure(conversion)
        if p.api == "v1":
            key: tuple[str, ...] = ("v1", p.base_url, p.key)
            batch = self._cfg.batch
        else:
            key, batch = ("track", p.key, conversion.key), self._single
        return Route(key=key, project=p.key, batch=batch, flow=p.flow, retry=self._cfg.retry)

    def item_bytes(self, conversion: Conversion) -> int:
        """v1: the visitor entry plus a comma (exact, excluding the ~60-byte envelope); track: 0 (no body)."""
        if self._project(conversion.project).api == "v1":
            return len(visitor_json(conversion).encode()) + 1
        return 0

    def build(self, route: Route, conversions: Sequence[Conversion], token: str | None = None) -> HttpRequest:
        p = self._project(route.project)
        headers = {"User-Agent": self._cfg.user_agent}
        if p.api == "v1":
            headers["Content-Type"] = "application/json"
            url = f"{p.base_url}/v1/track/{_q(p.account_id)}/{_q(p.project_id)}"
            return HttpRequest("POST", url, headers, v1_body(p, conversions), redacted_url=url)
        if len(conversions) != 1:
            raise ValueError(f"a Convert tracking call carries one conversion, got {len(conversions)}")
        url = track_url(p, conversions[0])
        return HttpRequest("GET", url, headers, None, redacted_url=url)

    def classify(self, request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
        return classify(request, status, headers, body)
