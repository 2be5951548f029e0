"""In Chromium: the Playground's chat streams tiny-lm's answer token by token, and Stop
cancels the sequence at the replica.

The whole path of issue 14's demo: register_demo_model's tiny-lm version (built here,
validated in the child), deployed on a real agent, called from the page through the gateway
with the portal session (POST /v1/chat/completions, streamed; generate_stream where that is
missing: the one stand-in here is that 404), the body read with a ReadableStream reader.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# Records the assistant's text after every change of the chat (the test's own observer: the
# page knows nothing of it), so "appears in steps" is checked, not guessed.
RECORD_UPDATES = """() => {
  window.chatUpdates = [];
  const list = document.getElementById("pg-chat-messages");
  new MutationObserver(() => {
    const rows = list.querySelectorAll(".chat-assistant .chat-text");
    if (rows.length) window.chatUpdates.push(rows[rows.length - 1].textContent);
  }).observe(list, {childList: true, subtree: true, characterData: true});
}"""
STATE_IS = "text => document.getElementById('pg-chat-state').textContent.startsWith(text)"
STOP_AT_FIRST_TEXT = """() => {
  const list = document.getElementById("pg-chat-messages");
  const observer = new MutationObserver(() => {
    const rows = list.querySelectorAll(".chat-assistant .chat-text");
    const text = rows.length ? rows[rows.length - 1].textContent : "";
    if (text.length > 0) {
      observer.disconnect();
      window.stoppedAt = text;
      document.getElementById("pg-chat-stop").click();
    }
  });
  observer.observe(list, {childList: true, subtree: true, characterData: true});
}"""
LAST_ANSWER = """() => {
  const rows = document.querySelectorAll("#pg-chat-messages .chat-assistant .chat-text");
  return rows.length ? rows[rows.length - 1].textContent : "";
}"""


def generation_counts(replica: Any) -> dict[str, int]:
    """Return the replica's engine counts from its /stats (running, cancelled, ...)."""
    from serving.secrets import replica_key

    answer = httpx.get(f"http://{replica.node.address}:{replica.port}/stats", timeout=10,
                       headers={"Authorization": f"Bearer {replica_key(replica.node_id)}"})
    answer.raise_for_status()
    counts: dict[str, int] = answer.json()["generation"]
    return counts


def ask(page: Any, prompt: str, max_tokens: int, temperature: float = 0.0) -> None:
    page.fill("#pg-chat-prompt", prompt)
    page.fill("#pg-chat-max-tokens", str(max_tokens))
    page.fill("#pg-chat-temperature", str(temperature))
    page.click("#pg-chat-send")


def test_the_playground_streams_a_chat_answer_and_stop_cancels_it(
        log_in, portal, operator, tmp_path, screenshot, monkeypatch):
    from registry.demo_lm import DEMO_LM_NAME
    from registry.management.commands.register_demo_model import DEMO_MODELS, register
    from serving import services
    from serving.models import Node, Replica, ReplicaState
    from tests.e2e import LiveAgent
    from tests.waiting import wait_until

    monkeypatch.setenv("SWARM_DEMO_CACHE", str(tmp_path / "demo-cache"))
    tiny_lm = next(demo for demo in DEMO_MODELS if demo.name == DEMO_LM_NAME)
    version = register(tiny_lm, operator)
    _token, secret = services.do_create_join_token(name="lm", user=operator,
                                                   expires_in=None, uses=1)
    agent = LiveAgent(portal.url, "lm-node", "9420-9439", tmp_path / "agent", secret).start()
    try:
        wait_until(lambda: Node.objects.filter(name="lm-node").exists(), 60, "the agent")
        services.do_create_deployment(name=DEMO_LM_NAME, model=version.model,
                                      version_number=version.number, alias_name="",
                                      user=operator, replicas=1)
        wait_until(lambda: Replica.objects.filter(deployment__name=DEMO_LM_NAME,
                                                  state=ReplicaState.READY).exists(),
                   120, "the tiny-lm replica to be ready")
        replica = Replica.objects.select_related("node").get(deployment__name=DEMO_LM_NAME,
                                                             state=ReplicaState.READY)
        page = log_in("olga")
        posted: list[str] = []
        page.on("request", lambda request: posted.append(request.url.split("/", 3)[3])
                if request.method == "POST" else None)
        page.goto(f"/playground/?deployment={DEMO_LM_NAME}")
        page.wait_for_selector("#pg-chat:not([hidden])", timeout=10_000)
        assert page.is_hidden("#pg-tensor")

        # Greedy, 48 tokens: the random weights never pick the end token this early.
        page.evaluate(RECORD_UPDATES)
        ask(page, "Hello, swarm.", max_tokens=48)
        page.wait_for_function(STATE_IS, arg="done", timeout=60_000)
        final = page.evaluate(LAST_ANSWER)
        updates = [text for text in page.evaluate("window.chatUpdates") if text]
        assert final and updates[-1] == final, page.text_content("#pg-chat-state")
        assert len(set(updates)) > 2, updates  # the text grew in steps, not once at the end
        assert all(final.startswith(text) for text in updates)
        assert "48 tokens" in page.text_content("#pg-chat-state")
        assert page.is_hidden("#pg-chat-error")
        assert posted == ["v1/chat/completions"]  # the chat endpoint: the model's template
        screenshot(page, "streamed")

        before = generation_counts(replica)
        page.click("#pg-chat-clear")  # a new chat: the whole context is left for the answer
        assert page.evaluate(LAST_ANSWER) == ""
        # Stop is pressed by the page's own observer the moment the first text shows: on a
        # quiet machine 400 tiny-lm tokens can finish before a click from here arrives.
        page.evaluate(STOP_AT_FIRST_TEXT)
        ask(page, "Tell me a long story.", max_tokens=400)
        page.wait_for_function(STATE_IS, arg="stopped", timeout=60_000)
        assert page.evaluate("window.stoppedAt")  # stopped after its first text
        assert page.is_enabled("#pg-chat-send") and page.is_disabled("#pg-chat-stop")
        wait_until(lambda: (counts := generation_counts(replica))["cancelled"]
                   > before["cancelled"] and counts["running"] == 0, 30,
                   "the replica to cancel the stopped sequence")
        screenshot(page, "stopped")

        # A request the replica refuses is shown as its error, and the prompt is kept.
        ask(page, "Too long.", max_tokens=100_000)
        page.wait_for_function(STATE_IS, arg="failed", timeout=30_000)
        error = page.text_content("#pg-chat-error")
        assert page.is_visible("#pg-chat-error") and error[:1] == "4", error
        assert page.input_value("#pg-chat-prompt") == "Too long."
        # Leaving the earlier turn out did not help: it is back in the transcript.
        assert page.locator("#pg-chat-messages .chat-left-out").count() == 0

        # A transcript that outgrows tiny-lm's 512 tokens: the oldest turn is left out and the
        # turn sent again, with a note (every send failed until Clear).
        page.click("#pg-chat-clear")
        ask(page, "Hello.", max_tokens=400)
        page.wait_for_function(STATE_IS, arg="done", timeout=120_000)
        del posted[:]
        ask(page, "And then?", max_tokens=400)
        page.wait_for_function(STATE_IS, arg="done", timeout=120_000)
        assert "1 earlier turn left out" in page.text_content("#pg-chat-state")
        assert posted == ["v1/chat/completions"] * 2  # refused, then sent without turn one
        assert page.locator("#pg-chat-messages .chat-left-out").count() == 2
        assert page.is_hidden("#pg-chat-error")

        # Where /v1 is missing (an older gateway answers 404), the page streams from the
        # replica's generate_stream through the same gateway instead.
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=404, content_type="application/json", body='{"error": "not found"}'))
        page.click("#pg-chat-clear")
        del posted[:]
        ask(page, "Hello again.", max_tokens=16)
        page.wait_for_function(STATE_IS, arg="done", timeout=60_000)
        assert posted == ["v1/chat/completions", f"v2/models/{DEMO_LM_NAME}/generate_stream"]
        assert page.evaluate(LAST_ANSWER) and "16 tokens" in page.text_content("#pg-chat-state")
    finally:
        agent.terminate(timeout_s=40)
