"""The Faust seam's static contract (:mod:`services.aggregator.faust_seam`); each failure names the hook.

1. The installed faust-streaming is the release the seam is verified against, and pyproject.toml and
   constraints.txt pin exactly that release (setup.sh and the Dockerfile install through both).
2. Every private hook, and the public Faust API the fetch loop relies on, still exists with the parameters the
   seam calls it with; Faust's fetcher still calls hook 2 and its consumer still builds the thread of hook 5.
3. mode's ``Service._stopped`` (hook 4) is the event a stopped service sets.
4. No aggregator module but the seam imports faust or mode, subclasses a class of theirs (or the seam's), or
   touches a private name that faust-streaming, mode or aiokafka define; the checker itself is shown to catch
   each kind of access on a snippet, so this test can fail.

The behaviour of the hooks with a running app and the real broker: ``tests/integration/test_faust_seam_behaviour.py``.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import inspect
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiokafka
import faust
import mode
import pytest
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from services.aggregator import faust_seam

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
AGGREGATOR = REPO / "services" / "aggregator"
SEAM = AGGREGATOR / "faust_seam.py"

# --------------------------------------------------------------------------------------------- 1. the pin


def test_the_installed_faust_streaming_is_the_verified_release_and_both_pins_say_so() -> None:
    installed = importlib.metadata.version("faust-streaming")
    assert installed == faust_seam.VERIFIED_VERSION, (
        f"faust-streaming {installed} is installed but the seam (services/aggregator/faust_seam.py) is verified "
        f"against {faust_seam.VERIFIED_VERSION}: run the Faust seam contract tests on the new release, then "
        "change VERIFIED_VERSION and the pins"
    )
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    faust_pins = [spec for spec in dependencies if re.match(r"faust-streaming\b", spec)]
    assert faust_pins == [f"faust-streaming=={faust_seam.VERIFIED_VERSION}"], (
        f"pyproject.toml must pin faust-streaming to exactly the verified release, has {faust_pins}"
    )
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    assert f"faust-streaming=={faust_seam.VERIFIED_VERSION}" in constraints, "constraints.txt pins another faust"


# --------------------------------------------------------------------------------------------- 2. signatures

#: (hook as named in the seam's docstring, owner, attribute, parameters, coroutine function)
SIGNATURES: list[tuple[str, type, str, list[str], bool]] = [
    ("hook 1 App._new_transport", faust.App, "_new_transport", ["self"], False),
    ("hook 2 Consumer._drain_messages", faust_consumer.Consumer, "_drain_messages", ["self", "fetcher"], True),
    ("hook 3 Consumer._wait_next_records", faust_consumer.Consumer, "_wait_next_records", ["self", "timeout"], True),
    ("hook 5 Consumer._new_consumer_thread", faust_aiokafka.Consumer, "_new_consumer_thread", ["self"], False),
    ("hook 5 thread.assignment", faust_aiokafka.AIOKafkaConsumerThread, "assignment", ["self"], False),
    ("hook 5 thread.seek_wait", faust_aiokafka.AIOKafkaConsumerThread, "seek_wait", ["self", "partitions"], True),
    (
        "hook 5 thread.seek_to_beginning",
        faust_aiokafka.AIOKafkaConsumerThread,
        "seek_to_beginning",
        ["self", "*partitions"],
        True,
    ),
    (
        "hook 5 thread.call_thread",
        faust_aiokafka.AIOKafkaConsumerThread,
        "call_thread",
        ["self", "fun", "*args", "**kwargs"],
        True,
    ),
    ("hook 6 thread._ensure_consumer", faust_aiokafka.AIOKafkaConsumerThread, "_ensure_consumer", ["self"], False),
    (
        "hook 7 thread._create_worker_consumer",
        faust_aiokafka.AIOKafkaConsumerThread,
        "_create_worker_consumer",
        ["self", "transport"],
        False,
    ),
    ("public Consumer.highwater", faust_aiokafka.Consumer, "highwater", ["self", "tp"], False),
    ("public Consumer.wait", faust_aiokafka.Consumer, "wait", ["self", "*coros", "timeout"], True),
    ("public Consumer.stop_flow", faust_aiokafka.Consumer, "stop_flow", ["self"], False),
    ("public Consumer.resume_flow", faust_aiokafka.Consumer, "resume_flow", ["self"], False),
]


def parameters(function: Any) -> list[str]:
    out = []
    for parameter in inspect.signature(function).parameters.values():
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        out.append(prefix + parameter.name)
    return out


@pytest.mark.parametrize(("hook", "owner", "name", "expected", "coroutine"), SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_each_hook_has_the_signature_the_seam_calls(
    hook: str, owner: type, name: str, expected: list[str], coroutine: bool
) -> None:
    function = getattr(owner, name, None)
    assert function is not None, f"faust {hook}: {owner.__qualname__}.{name} is gone"
    assert parameters(function) == expected, (
        f"faust {hook}: {owner.__qualname__}.{name}{inspect.signature(function)} no longer takes {expected}"
    )
    assert inspect.iscoroutinefunction(function) is coroutine, (
        f"faust {hook}: {owner.__qualname__}.{name} is {'no longer' if coroutine else 'now'} a coroutine function"
    )


def test_the_seam_overrides_exactly_the_hooks_it_names() -> None:
    assert faust_seam.SeamConsumer._drain_messages is not faust_consumer.Consumer._drain_messages
    assert issubclass(faust_seam.SeamConsumer, faust_aiokafka.Consumer), "hook 2: not Faust's aiokafka consumer"
    assert faust_seam.SeamTransport.Consumer is faust_seam.SeamConsumer
    assert issubclass(faust_seam.SeamTransport, faust_aiokafka.Transport), "hook 1: not Faust's aiokafka transport"
    assert faust_aiokafka.Transport.Consumer is faust_aiokafka.Consumer, "hook 1: the transport's consumer moved"
    overridden = {  # what the seam's classes define that their Faust bases have too (logger: mode sets it)
        name
        for cls in (
            faust_seam.SeamConsumer,
            faust_seam.SeamConsumerThread,
            faust_seam.SeamTransport,
            faust_seam.SeamApp,
        )
        for name in vars(cls)
        if hasattr(cls.__base__, name) and not name.startswith("__") and name not in {"logger", "_abc_impl"}
    }
    assert overridden == {
        "_drain_messages",
        "_new_consumer_thread",
        "_create_worker_consumer",
        "Consumer",
        "_new_transport",
    }


def test_faust_still_calls_the_hooks_where_the_seam_expects() -> None:
    fetcher = inspect.getsource(faust_consumer.Fetcher)
    assert "await consumer._drain_messages(self)" in fetcher, (
        "faust hook 2: Fetcher no longer runs Consumer._drain_messages(fetcher) as its task"
    )
    thread_consumer = inspect.getsource(faust_consumer.ThreadDelegateConsumer.__init__)
    assert "self._thread = self._new_consumer_thread()" in thread_consumer, (
        "faust hook 5: ThreadDelegateConsumer no longer keeps its consumer thread in _thread"
    )
    ensure = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._ensure_consumer)
    assert "return self._consumer" in ensure, "faust hook 6: _ensure_consumer no longer returns the aiokafka consumer"
    assert inspect.signature(faust_aiokafka.AIOKafkaConsumerThread._ensure_consumer).return_annotation in (
        aiokafka.AIOKafkaConsumer,
        "aiokafka.AIOKafkaConsumer",
    ), "faust hook 6: _ensure_consumer returns something else than an aiokafka consumer"
    new_transport = inspect.getsource(faust.App._new_transport)
    assert "self.conf.broker_consumer" in new_transport, (
        "faust hook 1: App._new_transport no longer builds the transport from conf.broker_consumer and the app"
    )
    assert faust_aiokafka.Consumer.consumer_stopped_errors == (aiokafka.errors.ConsumerStoppedError,), (
        "faust public Consumer.consumer_stopped_errors changed"
    )
    waits = inspect.getsource(faust_consumer.Consumer._wait_next_records)
    assert "if not self.flow_active" in waits and "self.can_resume_flow" in waits, (
        "faust hook 3: _wait_next_records no longer waits while the flow is stopped"
    )
    assert "_get_active_partitions()" in waits, "faust hook 3: _wait_next_records no longer skips paused partitions"
    create = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_consumer)
    assert "self._create_worker_consumer(transport)" in create, (
        "faust hook 7: the consumer thread no longer builds its aiokafka consumer with _create_worker_consumer"
    )
    assert "fetch_max_bytes" not in inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer), (
        "faust hook 7: Faust now passes fetch_max_bytes itself; set it through its configuration instead"
    )


async def test_aiokafka_hands_the_consumers_fetch_max_bytes_to_its_fetcher() -> None:
    """Hook 7 sets ``_fetch_max_bytes`` on an aiokafka consumer that has not started; ``start()`` must read it."""
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_bytes=12345)
    assert consumer._fetch_max_bytes == 12345, "aiokafka hook 7: fetch_max_bytes is no longer kept in _fetch_max_bytes"
    start = inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    assert "fetch_max_bytes=self._fetch_max_bytes" in start, (
        "aiokafka hook 7: AIOKafkaConsumer.start() no longer gives its fetcher self._fetch_max_bytes"
    )


# --------------------------------------------------------------------------------------------- 3. _stopped


async def test_a_stopped_mode_service_sets_its_stopped_event() -> None:
    service = mode.Service()
    stopped = getattr(service, "_stopped", None)
    assert stopped is not None and callable(getattr(stopped, "is_set", None)), (
        "mode hook 4: Service._stopped is no longer an event"
    )
    await service.start()
    assert not service._stopped.is_set(), "mode hook 4: Service._stopped is set while the service runs"
    await asyncio.wait_for(service.stop(), 5)
    assert service._stopped.is_set(), "mode hook 4: Service._stopped is not set once the service stopped"


# --------------------------------------------------------------------------------------------- 4. privates


def private_names() -> set[str]:
    """Every private name faust-streaming, mode and aiokafka define: attributes (class and ``self._x = ...``),
    methods, module globals. Collected from their source, so a name a release adds is covered at once."""
    names: set[str] = set()
    for package in (faust, mode, aiokafka):
        root = Path(package.__file__).parent
        for path in root.rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            names.update(re.findall(r"\b(?:self|cls)\.(_[A-Za-z]\w*)\s*[:=]", text))
            names.update(re.findall(r"^\s*(?:async\s+)?def\s+(_[A-Za-z]\w*)", text, re.M))
            names.update(re.findall(r"^\s*(_[A-Za-z]\w*)\s*[:=]", text, re.M))
    return {name for name in names if not name.startswith("__")}


def violations(source: str, foreign_private: set[str]) -> Iterator[str]:
    """What a module outside the seam may not do (see the module docstring, step 4)."""
    tree = ast.parse(source)
    seam_classes = {"SeamApp", "SeamConsumer", "SeamTransport", "AggregatorApp"}
    own: set[str] = set()  # private attributes the module's own classes define (self._x = ...)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
                own.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            own.add(node.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in {"faust", "mode"}:
                    yield f"line {node.lineno}: imports {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"faust", "mode"}:
            yield f"line {node.lineno}: imports from {node.module}"
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                text = ast.unparse(base)
                if text.split(".")[0] in {"faust", "mode", "faust_aiokafka"} or text.split(".")[-1] in seam_classes:
                    yield f"line {node.lineno}: class {node.name} subclasses {text}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            on_self = isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}
            if node.attr in foreign_private and not (on_self and node.attr in own):
                yield f"line {node.lineno}: touches {ast.unparse(node)} (a private name of faust, mode or aiokafka)"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"getattr", "setattr"}:
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and str(node.args[1].value)[:1] == "_":
                yield f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})"


@pytest.fixture(scope="module")
def foreign_private() -> set[str]:
    names = private_names()
    assert {"_drain_messages", "_new_transport", "_wait_next_records", "_thread", "_stopped"} <= names
    return names


@pytest.mark.parametrize(
    "snippet",
    [
        "thread = consumer._thread",
        "consumer._ensure_consumer().commit({})",
        "from faust.transport.drivers import aiokafka",
        "import mode",
        "class C(SeamConsumer):\n    pass",
        "class C(faust.App):\n    pass",
        "x = getattr(consumer, '_thread')",
        "class C:\n    def f(self):\n        return self._stopped.is_set()",
        "done = fetcher._stopped.is_set",
        "producer._sender.flush()",
    ],
)
def test_the_checker_catches_each_kind_of_private_access(snippet: str, foreign_private: set[str]) -> None:
    assert list(violations(snippet, foreign_private)), f"not caught: {snippet!r}"


def test_own_private_attributes_are_not_flagged(foreign_private: set[str]) -> None:
    snippet = (
        "class C:\n    def __init__(self):\n        self._stopped = 1\n    def f(self):\n        return self._stopped"
    )
    assert not list(violations(snippet, foreign_private))


def test_no_aggregator_module_but_the_seam_touches_a_private_faust_name(foreign_private: set[str]) -> None:
    found = {
        path.name: found
        for path in sorted(AGGREGATOR.glob("*.py"))
        if path != SEAM and (found := list(violations(path.read_text(encoding="utf-8"), foreign_private)))
    }
    assert not found, f"only services/aggregator/faust_seam.py may touch Faust's internals: {found}"
