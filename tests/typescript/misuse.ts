// Wrong uses of the browser client: tsc must refuse each line marked
// "expect-error", and only those (tests/test_client_types.py checks the
// line numbers tsc reports under tsconfig.misuse.json).
import { HappyRobotClient, type RoomEvent } from "../../happyrobot/static/client.js";

interface Task {
  id: string;
  title: string;
}

const client = new HappyRobotClient("ws://localhost:3001/ws", { userId: "user_1" });

new HappyRobotClient("ws://localhost:3001/ws", {}); // expect-error: neither userId nor token
new HappyRobotClient(new URL("ws://localhost:3001/ws"), { userId: "u" }); // expect-error: the URL must be a string
new HappyRobotClient({ userId: "u", ack: "always" }); // expect-error: ack is "auto", true or false
new HappyRobotClient({ userId: "u", reconnect: { baseMs: "500" } }); // expect-error: a number
client.on("disconect", () => {}); // expect-error: not an event name
client.on("state", (event) => event.delayMs); // expect-error: only while reconnecting
client.on("rejoin", ({ since }) => since.toFixed()); // expect-error: since may be null
client.on("ERROR", (m) => m.code === "NOT_A_CODE"); // expect-error: no such code
client.on("USER_PRESENCE", (m) => m.payload.users); // expect-error: activeUsers
client.on("TASK_UPDATE", (m: RoomEvent<"TASK_UPDATE", Task>) => m.payload.title); // expect-error: payload may be missing
client.on("TASK_UPDATE", (m: RoomEvent<"TASK_UPDATE", Task>) => m.payload?.name); // expect-error: not a Task field
client.send("TASK_UPDTE", "p1", { id: "t1" }); // expect-error: not an event type
client.send("TASK_UPDATE", "p1", [1, 2]); // expect-error: a payload is an object
client.send("TASK_UPDATE", "p1", "text"); // expect-error: a payload is an object
client.send("TASK_UPDATE", "p1", {}, { operationId: 7 }); // expect-error: a string
client.join(42); // expect-error: a project id is a string
client.setUser({ userInfo: { firstName: 1 } }); // expect-error: strings only
const state: "open" | "closed" = client.state; // expect-error: two more states
client.state = "open"; // expect-error: read-only
const promise: Promise<void> = client.send("TASK_DELETE", "p1"); // expect-error: resolves with a SendResult
console.log(state, promise);
client.on("revoked", ({ projectId }) => projectId.toFixed()); // expect-error: a string
