// The real `ai` package (pinned in package.json) against a running turnstream demo: its
// DefaultChatTransport talks to POST /api/chat and GET /api/chat/{id}/stream, and
// readUIMessageStream assembles the assistant message from the UI message stream.
//
// Run by tests/e2e/test_ai_sdk_node.py, which starts the demo and sets:
//   TURNSTREAM_DEMO_URL   the demo's base URL
//   TURNSTREAM_REPLIES    JSON {message: the fake model's reply to it}
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { DefaultChatTransport, readUIMessageStream } from "ai";

const BASE = process.env.TURNSTREAM_DEMO_URL;
const REPLIES = JSON.parse(process.env.TURNSTREAM_REPLIES ?? "{}");
const MESSAGES = Object.keys(REPLIES);
assert.ok(BASE, "TURNSTREAM_DEMO_URL is not set");
assert.ok(MESSAGES.length >= 2, "TURNSTREAM_REPLIES needs at least two messages");

function transport(headers = {}) {
  const responses = [];
  const recording = async (url, init) => {
    const response = await fetch(url, init);
    responses.push(response);
    return response;
  };
  const t = new DefaultChatTransport({ api: `${BASE}/api/chat`, headers, fetch: recording });
  return { t, responses };
}

function userMessage(text) {
  return { id: randomUUID(), role: "user", parts: [{ type: "text", text }] };
}

function textOf(message) {
  return message.parts
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");
}

async function lastMessage(stream) {
  let last;
  for await (const message of readUIMessageStream({
    stream,
    onError: (error) => assert.fail(`stream error: ${error}`),
  })) {
    last = message;
  }
  assert.ok(last, "the stream gave no message");
  return last;
}

function send(t, chatId, messages, options = {}) {
  return t.sendMessages({
    chatId,
    messages,
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
    ...options,
  });
}

async function producerCalls(executionId) {
  const url = `${BASE}/debug/producer-calls?executionId=${encodeURIComponent(executionId)}`;
  const response = await fetch(url);
  return (await response.json()).calls;
}

test("a turn streams the model's reply as one assistant message", async () => {
  const chatId = randomUUID();
  const { t, responses } = transport();
  const message = await lastMessage(await send(t, chatId, [userMessage(MESSAGES[0])]));
  assert.equal(textOf(message), REPLIES[MESSAGES[0]]);
  assert.equal(message.role, "assistant");
  assert.equal(message.id, `demo:${chatId}:0`); // messageId = execution id
  assert.equal(message.parts.at(-1).state, "done");
  const headers = responses[0].headers;
  assert.equal(headers.get("x-vercel-ai-ui-message-stream"), "v1");
  assert.equal(headers.get("x-turn-mode"), "fresh");
});

test("abort mid-stream, then reconnectToStream completes the turn", async () => {
  const chatId = randomUUID();
  const reply = REPLIES[MESSAGES[1]];
  const { t } = transport();
  const controller = new AbortController();
  const stream = await send(t, chatId, [userMessage(MESSAGES[1])], {
    abortSignal: controller.signal,
  });
  let partial = "";
  try {
    for await (const message of readUIMessageStream({ stream })) {
      partial = textOf(message);
      if (partial.length > 0) {
        controller.abort(); // the tab closes: the turn goes on without us
        break;
      }
    }
  } catch (error) {
    assert.equal(error.name, "AbortError");
  }
  assert.ok(partial.length > 0 && partial.length < reply.length, `partial: ${partial}`);
  assert.ok(reply.startsWith(partial));

  const resumed = await t.reconnectToStream({ chatId });
  assert.ok(resumed, "reconnectToStream found nothing to resume");
  const message = await lastMessage(resumed);
  assert.equal(textOf(message), reply); // the whole turn, nothing twice
  assert.equal(message.id, `demo:${chatId}:0`);
  assert.equal(await producerCalls(`demo:${chatId}:0`), 1);
});

test("a retry replays the turn without asking the model again", async () => {
  const chatId = randomUUID();
  const { t, responses } = transport();
  const messages = [userMessage(MESSAGES[0])];
  const first = await lastMessage(await send(t, chatId, messages));
  const again = await lastMessage(
    await send(t, chatId, messages, { trigger: "regenerate-message" }),
  );
  assert.equal(textOf(again), textOf(first));
  assert.equal(again.id, first.id);
  assert.equal(responses[1].headers.get("x-turn-mode"), "replayed");
  assert.equal(await producerCalls(`demo:${chatId}:0`), 1);
});

test("the next user message is the next turn, and resume finds it", async () => {
  const chatId = randomUUID();
  const { t } = transport();
  const u1 = userMessage(MESSAGES[0]);
  const a1 = await lastMessage(await send(t, chatId, [u1]));
  const u2 = userMessage(MESSAGES[1]);
  const a2 = await lastMessage(await send(t, chatId, [u1, a1, u2]));
  assert.equal(a2.id, `demo:${chatId}:1`);
  assert.equal(textOf(a2), REPLIES[MESSAGES[1]]);
  const resumed = await lastMessage(await t.reconnectToStream({ chatId }));
  assert.equal(resumed.id, a2.id);
  assert.equal(textOf(resumed), textOf(a2));
});

test("nothing to resume: an unknown chat, another tenant's or another user's", async () => {
  const chatId = randomUUID();
  const { t } = transport();
  assert.equal(await t.reconnectToStream({ chatId }), null);
  await lastMessage(await send(t, chatId, [userMessage(MESSAGES[0])]));
  assert.ok(await t.reconnectToStream({ chatId }));
  const otherTenant = transport({ "X-Demo-Tenant": "someone-else" }).t;
  assert.equal(await otherTenant.reconnectToStream({ chatId }), null);
  const otherUser = transport({ "X-Demo-User": "eve" }).t;
  assert.equal(await otherUser.reconnectToStream({ chatId }), null);
});

test("a cancelled turn ends with its partial text, and stays cancelled on resume", async () => {
  const chatId = randomUUID();
  const executionId = `demo:${chatId}:0`;
  const reply = REPLIES[MESSAGES[0]];
  const { t } = transport();
  const chunks = [];
  const stream = (await send(t, chatId, [userMessage(MESSAGES[0])])).pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        chunks.push(chunk);
        controller.enqueue(chunk);
      },
    }),
  );
  let cancelled = false;
  let last;
  for await (const message of readUIMessageStream({ stream })) {
    last = message;
    if (!cancelled && textOf(message).length > 0) {
      cancelled = true;
      const response = await fetch(`${BASE}/turns/${encodeURIComponent(executionId)}/cancel`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: "{}",
      });
      assert.equal(response.status, 202);
    }
  }
  assert.deepEqual(chunks.at(-1), { type: "abort", reason: "cancelled" });
  const text = textOf(last);
  assert.ok(text.length > 0 && text.length < reply.length && reply.startsWith(text), text);
  const resumed = await lastMessage(await t.reconnectToStream({ chatId }));
  assert.equal(textOf(resumed), text);
});

test("a bad body is a 400 the transport reports", async () => {
  const { t } = transport();
  await assert.rejects(send(t, randomUUID(), [{ id: "x", role: "user", parts: [] }]), /text/);
});
