// The browser client used from TypeScript, as docs/clients.md shows it (the
// part after the import is the documentation's example, word for word),
// then the rest of the API.  tests/test_client_types.py type-checks it with
// tsc --noEmit under tsconfig.json (strict).
import {
  CLOSE_USER_DISCONNECTED,
  HappyRobotClient,
  STATES,
  createClient,
  type ConnectionState,
  type RoomEvent,
  type SendError,
  type ServerMessage,
  type WebSocketConstructor,
} from "../../happyrobot/static/client.js";
import DefaultClient from "../../happyrobot/static/client.js";

// A session token source, as Clerk's getToken() (from useAuth()) in a Next.js app.
declare function getToken(): Promise<string | null>;

// docs/clients.md: begin
interface Task {
  id: string;
  title: string;
}

const client = new HappyRobotClient("wss://rt.example.com/ws", {
  token: () => getToken(), // e.g. Clerk's; called before every (re)connection
  userInfo: { firstName: "Ann", lastName: "Lee" },
});
client.on("state", (event) => {
  if (event.state === "reconnecting") console.log("retrying in", event.delayMs, "ms");
});
client.on("USER_PRESENCE", (m) => console.log(m.payload.activeUsers.map((u) => u.initials)));
client.on("ERROR", (m) => console.warn(m.code, m.error));
client.on("TASK_UPDATE", (m: RoomEvent<"TASK_UPDATE", Task>) => console.log(m.payload?.title, m.seq));
client.on("rejoin", ({ projectId, since }) => console.log("reload", projectId, "after", since));
client.connect();
client.join("p1");

export async function renameTask(task: Task): Promise<void> {
  try {
    const { ack } = await client.send("TASK_UPDATE", "p1", task);
    console.log("stored as", ack?.seq);
  } catch (error) {
    console.warn("not sent:", (error as SendError).code);
  }
}
// docs/clients.md: end

// The other ways to make a client.
const byDefault: HappyRobotClient = new DefaultClient({ userId: "user_1" });
const made: HappyRobotClient = createClient("ws://localhost:3001/ws", {
  userId: "user_1",
  reconnect: { baseMs: 250 },
  maxQueue: 10,
  ack: "auto",
  WebSocket,
  random: Math.random,
});
const sameServer = createClient({ token: "eyJ..." });

// Every state, in order; the current one.
const states: readonly ConnectionState[] = STATES;
const current: ConnectionState = sameServer.state;
console.log(states.indexOf(current), made.rooms.length, made.queued, made.clientId?.length);

// A WebSocket class of one's own (in Node, say) fits the option.
class FakeSocket {
  readyState = 0;
  onopen: (() => void) | null = null;
  onmessage: ((event: { data: string }) => void) | null = null;
  onclose: ((event: { code: number; reason: string; wasClean: boolean }) => void) | null = null;
  onerror: (() => void) | null = null;
  constructor(readonly url: string) {}
  send(data: string): void {
    console.log(this.url, data);
  }
  close(code?: number, reason?: string): void {
    console.log(code, reason);
  }
}
const fake: WebSocketConstructor = FakeSocket;
const tested = new HappyRobotClient("ws://test/ws", { userId: "u", WebSocket: fake, ack: false });

// Every kind of handler, and removing them.
const stop = tested.on("*", (m: ServerMessage) => console.log(m.type, m.timestamp));
stop();
const onDisconnect = (e: { code: number; reason: string; wasClean: boolean }) => console.log(e.code);
tested.on("disconnect", onDisconnect);
tested.off("disconnect", onDisconnect);
tested.on("dropped", (event) => console.log(event.type, event.operationId));
// (v2) Taken out of a room, or disconnected for good, by the operator API.
tested.on("revoked", ({ projectId, reason }) => console.log("no longer in", projectId, reason));
tested.on("terminated", ({ code, reason }) => console.log(code === CLOSE_USER_DISCONNECTED, reason));
tested.on("CONNECTION_ESTABLISHED", (m) => console.log(m.clientId));
tested.on("ACK", (m) => console.log(m.operationId, m.seq));
tested.on("RESYNC_REQUIRED", (m) => console.log("reload", m.projectId, "from", m.seq));
tested.on("PROJECT_DELETE", (m) => {
  // Relayed from a client (sender) or published by the back end (userId).
  const who = m.sender ? m.sender.userId : m.userId;
  console.log(m.projectId, who, m.payload?.["reason"]);
});
tested.on("ERROR", (m) => {
  switch (m.code) {
    case "ACCESS_REVOKED":
      console.log("left", m.projectId);
      break;
    case "UNAUTHORIZED":
    case "FORBIDDEN":
      tested.close();
      break;
    default:
      console.warn(m.operationId ?? "-", m.error);
  }
});

// Sending: a payload of one's own type, none, or null; an operation id.
const result = await tested.send("COMMENT_CREATE", "p1", { id: "c1", text: "Hi" }, { operationId: "op-1" });
console.log(result.operationId, result.ack === null);
await tested.send("TASK_DELETE", "p1");
await tested.send("PROJECT_UPDATE", "p1", null);

// Changing the user: a field left out is kept, null removes it.
tested.setUser({ userId: "u2", userInfo: { name: "Mary Jane Watson", email: "mj@example.com" } });
tested.setUser({ token: async () => "eyJ...", userInfo: null });
tested.leave("p1");
tested.close();
console.log(byDefault.url, tested.userId, tested.ack);
