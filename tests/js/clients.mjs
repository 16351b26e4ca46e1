// Real JavaScript clients against the proxy, each with its default request handler
// (the SDK's NodeHttp2Handler: h2c on http://, h2 by ALPN on https://).
//
//   node clients.mjs '{"endpoint": "...", "region": "us-east-1", "calls": ["converse", ...]}'
//
// Credentials come from the environment as a user's would: AWS_ACCESS_KEY_ID and
// AWS_SECRET_ACCESS_KEY (a virtual key pair), or AWS_BEARER_TOKEN_BEDROCK. A self-signed
// certificate is trusted through NODE_EXTRA_CA_CERTS. Prints one JSON line per call.
import {
  BedrockRuntimeClient,
  ConverseCommand,
  ConverseStreamCommand,
  InvokeModelWithBidirectionalStreamCommand,
} from "@aws-sdk/client-bedrock-runtime";
import {
  BedrockAgentRuntimeClient,
  RetrieveCommand,
} from "@aws-sdk/client-bedrock-agent-runtime";

const spec = JSON.parse(process.argv[2]);
const config = { endpoint: spec.endpoint, region: spec.region, maxAttempts: 1 };
const messages = [{ role: "user", content: [{ text: "Hello" }] }];

function describe(err) {
  return { error: err.name, message: err.message, status: err.$metadata?.httpStatusCode };
}

const calls = {
  async converse() {
    const client = new BedrockRuntimeClient(config);
    const reply = await client.send(new ConverseCommand({ modelId: spec.model, messages }));
    return {
      handler: client.config.requestHandler.constructor.name,
      text: reply.output.message.content[0].text,
      usage: reply.usage,
    };
  },

  async "converse-stream"() {
    const client = new BedrockRuntimeClient(config);
    const reply = await client.send(new ConverseStreamCommand({ modelId: spec.model, messages }));
    const kinds = [];
    let text = "";
    for await (const event of reply.stream) {
      const kind = Object.keys(event).find((k) => event[k] !== undefined);
      kinds.push(kind);
      if (kind === "contentBlockDelta") text += event.contentBlockDelta.delta.text ?? "";
    }
    return { events: kinds.length, first: kinds[0], last: kinds.at(-1), text };
  },

  async retrieve() {
    const client = new BedrockAgentRuntimeClient(config);
    const reply = await client.send(
      new RetrieveCommand({ knowledgeBaseId: spec.knowledgeBase, retrievalQuery: { text: "q" } }),
    );
    return { results: reply.retrievalResults.length };
  },

  async langchain() {
    const { ChatBedrockConverse } = await import("@langchain/aws");
    // LangChain builds its client for an https:// endpointHost; for plain h2c it is
    // given the SDK's own default client.
    const tls = spec.endpoint.startsWith("https://");
    const model = new ChatBedrockConverse({
      model: spec.model,
      region: spec.region,
      maxRetries: 0,
      ...(tls
        ? { endpointHost: spec.endpoint.slice("https://".length) }
        : { client: new BedrockRuntimeClient(config) }),
    });
    const reply = await model.invoke("Hello");
    return { handler: model.client.config.requestHandler.constructor.name, text: reply.content };
  },

  // A full-duplex session, Nova Sonic-style: each event is sent only after the answer to
  // the previous one has arrived, so a transport that buffers either side deadlocks.
  async bidi() {
    const client = new BedrockRuntimeClient(config);
    const turns = spec.turns ?? 3;
    const answered = [];
    let wake = null;
    const waitAnswer = (n) =>
      new Promise((resolve) => {
        const check = () => (answered.length >= n ? resolve() : (wake = check));
        check();
      });
    const encoder = new TextEncoder();
    async function* input() {
      for (let i = 0; i < turns; i++) {
        const event = { event: { turn: i, text: `event ${i}` } };
        yield { chunk: { bytes: encoder.encode(JSON.stringify(event)) } };
        await waitAnswer(i + 1);
      }
    }
    const reply = await client.send(
      new InvokeModelWithBidirectionalStreamCommand({ modelId: spec.model, body: input() }),
    );
    const decoder = new TextDecoder();
    const seen = [];
    for await (const event of reply.body) {
      if (event.chunk) {
        const payload = JSON.parse(decoder.decode(event.chunk.bytes));
        seen.push(payload);
        if (payload.event?.textOutput) answered.push(payload);
        if (wake) {
          const w = wake;
          wake = null;
          w();
        }
      } else {
        const kind = Object.keys(event).find((k) => event[k] !== undefined);
        return { answers: seen, error: kind, message: event[kind]?.message };
      }
    }
    return { answers: seen };
  },

  // `sessions` of those at once, on one key: each session's outcome, in order.
  async bidiParallel() {
    const outcomes = await Promise.all(
      Array.from({ length: spec.sessions ?? 3 }, () =>
        calls.bidi().then(
          (result) => ({ ok: !result.error, ...result }),
          (err) => ({ ok: false, ...describe(err) }),
        ),
      ),
    );
    return { sessions: outcomes };
  },
};

for (const name of spec.calls) {
  try {
    const result = await calls[name]();
    console.log(JSON.stringify({ call: name, ok: true, ...result }));
  } catch (err) {
    console.log(JSON.stringify({ call: name, ok: false, ...describe(err) }));
  }
}
