/**
 * TypeScript declarations for the Happy Robot browser client, the ES module
 * `client.js` beside this file (the server serves both: GET /client.js and
 * GET /client.d.ts).  The message shapes are those of docs/PROTOCOL.md.
 *
 *   import { HappyRobotClient, type RoomEvent } from "./happyrobot/client.js";
 *   const client = new HappyRobotClient("wss://rt.example.com/ws", { userId: "user_1" });
 *   client.on("USER_PRESENCE", (m) => m.payload.userCount);
 *   client.on("TASK_UPDATE", (m: RoomEvent<"TASK_UPDATE", Task>) => m.payload?.title);
 *
 * Fields marked (v2) are sent by this server; a server of protocol v1 (the
 * original Node.js server) leaves them out.
 */

// ------------------------------------------------------------------ basics

/** A JSON value, as the server passes it through. */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/** An event's payload as received, when no more precise type is given: a JSON object. */
export type Payload = { [key: string]: unknown };

/** The connection states, in the order a connection normally goes through them. */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** The connection states, in the order a connection normally goes through them. */
export declare const STATES: readonly ["connecting", "open", "reconnecting", "closed"];

/** (v2) The close code of a server-side disconnect of the user: the client does not reconnect. */
export declare const CLOSE_USER_DISCONNECTED: 4403;

/** The seven event types a client may send; the server relays them to the other members of the room. */
export type EventType =
  | "TASK_CREATE"
  | "TASK_UPDATE"
  | "TASK_DELETE"
  | "COMMENT_CREATE"
  | "COMMENT_UPDATE"
  | "COMMENT_DELETE"
  | "PROJECT_UPDATE";

/** The `code` of an ERROR message (docs/PROTOCOL.md, "Errors"). */
export type ErrorCode =
  | "INVALID_JSON"
  | "TOO_DEEP"
  | "INVALID_MESSAGE"
  | "UNKNOWN_TYPE"
  | "INVALID_OPERATION_ID"
  | "MISSING_PROJECT_ID"
  | "INVALID_PROJECT_ID"
  | "INVALID_PAYLOAD"
  | "INVALID_USER_ID"
  | "INVALID_USER_INFO"
  | "INVALID_TOKEN"
  | "MISSING_USER_ID"
  | "NOT_IDENTIFIED"
  | "NOT_IN_PROJECT"
  | "TOO_MANY_ROOMS"
  | "UNAUTHORIZED"
  | "FORBIDDEN"
  | "AUTH_UNAVAILABLE"
  | "UNAVAILABLE"
  | "RATE_LIMITED"
  | "BINARY_NOT_SUPPORTED"
  | "INVALID_SINCE"
  | "INVALID_ACK"
  | "MISSING_OPERATION_ID"
  | "ACCESS_REVOKED"
  | "INTERNAL_ERROR";

/**
 * What the user tells the server about themselves in SET_USER: strings of at
 * most 256 characters (null is skipped), at most 32 keys.  The server keeps
 * firstName, lastName, name and email, for the initials of presence.
 */
export interface UserInfo {
  firstName?: string | null;
  lastName?: string | null;
  name?: string | null;
  email?: string | null;
  [key: string]: string | null | undefined;
}

/**
 * A session token, or a function called before every (re)connection that
 * returns (a promise of) a fresh one.  A function that returns nothing, or
 * throws, makes the client identify without a token.
 */
export type TokenSource =
  | string
  | (() => string | null | undefined | PromiseLike<string | null | undefined>);

// --------------------------------------------------------- server messages

/** The greeting, once per connection. */
export interface ConnectionEstablishedMessage {
  type: "CONNECTION_ESTABLISHED";
  /** The id of this connection (not of the user): an opaque string. */
  clientId: string;
  timestamp: number;
}

/** One connection in a room: a user with two tabs appears twice. */
export interface ActiveUser {
  userId: string;
  clientId: string;
  /** When this connection joined the room (ms since the epoch). */
  joinedAt: number;
  initials: string;
}

/** The complete list of a room's connections, after every change (it replaces the previous one). */
export interface UserPresenceMessage {
  type: "USER_PRESENCE";
  payload: {
    projectId: string;
    activeUsers: ActiveUser[];
    /** Connections, not people. */
    userCount: number;
  };
  operationId: string;
  timestamp: number;
}

/** A message the server could not act on; the connection stays usable. */
export interface ErrorMessage {
  type: "ERROR";
  /** A sentence for people; it may change. */
  error: string;
  /** (v2) A stable word for programs. */
  code: ErrorCode;
  /** The operationId of the offending message, when the server could read one. */
  operationId?: string;
  /** (v2) The room the error is about (ACCESS_REVOKED). */
  projectId?: string;
  timestamp: number;
}

/** (v2) An event sent with `"ack": true` is in the room's history as number `seq`. */
export interface AckMessage {
  type: "ACK";
  operationId: string;
  projectId: string;
  seq: number;
  timestamp: number;
}

/**
 * (v2) The room's history does not reach back to the client's last seq
 * (or Redis failed over and lost events the client saw): reload the room
 * from the back end; live events continue after `seq`.
 * (The answer to a room's first join is kept by the client, not passed on.)
 */
export interface ResyncRequiredMessage {
  type: "RESYNC_REQUIRED";
  projectId: string;
  seq: number;
  timestamp: number;
}

/** Who sent a relayed event. */
export interface Sender {
  clientId: string;
  userId: string;
}

/** An event another connection sent into the room (TASK_UPDATE, ...). */
export interface RelayedEvent<T extends string = string, P extends object = Payload> {
  type: T;
  projectId: string;
  /** Left out when the sender left it out. */
  payload?: P | null;
  operationId?: string;
  /** When the server relayed it (ms since the epoch). */
  timestamp: number;
  /** (v2) The room's sequence number of this event. */
  seq: number;
  /** (v2) The sending connection and its user. */
  sender: Sender;
  userId?: never;
}

/** An event the back end published with POST /broadcast (any upper-case type, e.g. PROJECT_DELETE). */
export interface BroadcastEvent<T extends string = string, P extends object = Payload> {
  type: T;
  projectId: string;
  payload?: P | null;
  operationId: string;
  timestamp: number;
  /** (v2) The room's sequence number of this event. */
  seq: number;
  /** The user who made the change, or null. */
  userId: string | null;
  sender?: never;
}

/** An event of a room: relayed from a client (it has `sender`) or broadcast by the back end (it has `userId`). */
export type RoomEvent<T extends string = string, P extends object = Payload> =
  | RelayedEvent<T, P>
  | BroadcastEvent<T, P>;

/** The server messages of the protocol's own types, by type. */
export interface ServerMessageMap {
  CONNECTION_ESTABLISHED: ConnectionEstablishedMessage;
  USER_PRESENCE: UserPresenceMessage;
  ERROR: ErrorMessage;
  ACK: AckMessage;
  RESYNC_REQUIRED: ResyncRequiredMessage;
}

/** Every message a "*" handler may get. */
export type ServerMessage = ServerMessageMap[keyof ServerMessageMap] | RoomEvent;

// ------------------------------------------------------------ client events

/** The "state" event: the connection state changed. */
export type StateEvent =
  | {
      state: "reconnecting";
      previous: ConnectionState;
      /** The close code of the connection that ended. */
      code: number;
      /** How long the client waits before the next attempt. */
      delayMs: number;
    }
  | { state: "connecting" | "open" | "closed"; previous: ConnectionState };

/** The "disconnect" event: a connection ended (the client reconnects unless closed). */
export interface DisconnectEvent {
  code: number;
  reason: string;
  wasClean: boolean;
}

/** The "rejoin" event: a room is joined again after a reconnection. */
export interface RejoinEvent {
  projectId: string;
  /** The last seq seen in the room (v2 servers), from which the server replays; null without one. */
  since: number | null;
}

/** (v2) The "revoked" event: the server took the client out of a room; it is not joined again. */
export interface RevokedEvent {
  projectId: string;
  /** The ERROR's text. */
  reason: string;
}

/** (v2) The "terminated" event: the server disconnected the user; the client is closed for good. */
export interface TerminatedEvent {
  code: 4403;
  reason: string;
}

/** An event as the client sends it; the "dropped" event hands one over. */
export interface OutgoingEvent<P extends object = Payload> {
  type: EventType;
  projectId: string;
  operationId: string;
  payload?: P | null;
  ack?: true;
}

/** The client's own events, by name. */
export interface ClientEventMap {
  state: StateEvent;
  /** An event pushed out of the full offline queue (its send() promise is rejected). */
  dropped: OutgoingEvent;
  disconnect: DisconnectEvent;
  rejoin: RejoinEvent;
  revoked: RevokedEvent;
  terminated: TerminatedEvent;
}

/**
 * The names on() takes for room events: upper case, like every type of the
 * protocol, and none of the names with a handler type of their own.
 */
export type RoomEventName<T extends string> = string extends T
  ? T
  : T extends keyof ClientEventMap | keyof ServerMessageMap | "*"
    ? never
    : T extends Uppercase<T>
      ? T
      : never;

// ------------------------------------------------------------------ client

/** The minimal WebSocket the client needs (the WHATWG one, or e.g. the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** The client sets the four handlers, as the WHATWG WebSocket defines them. */
  onopen: unknown;
  onmessage: unknown;
  onclose: unknown;
  onerror: unknown;
}

/** A WebSocket class. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** How the client acknowledges: "auto" (wait for ACKs once the server has sent one), always, or never. */
export type AckMode = "auto" | boolean;

/** The options every client takes. */
export interface BaseOptions {
  /** firstName, lastName, name, email... sent in SET_USER. */
  userInfo?: UserInfo;
  /** Backoff: attempt n waits a random time between 0 and min(maxMs, baseMs * 2^n). */
  reconnect?: { baseMs?: number; maxMs?: number };
  /** Events kept while offline (1000); when full the oldest is dropped and "dropped" emitted. */
  maxQueue?: number;
  /** "auto" (default), true or false. */
  ack?: AckMode;
  /** The WebSocket class (globalThis.WebSocket by default): for Node or tests. */
  WebSocket?: WebSocketConstructor;
  /** A source of numbers in [0, 1) for the jitter (Math.random). */
  random?: () => number;
}

/** The client's options: a userId or a token is required. */
export type HappyRobotClientOptions = BaseOptions &
  (
    | { /** The user id sent in SET_USER. */ userId: string; token?: TokenSource }
    | { userId?: string; /** A session token (its `sub` is the user id). */ token: TokenSource }
  );

/** What setUser() changes; a field left out is kept, null removes it. */
export interface UserUpdate {
  userId?: string | null;
  userInfo?: UserInfo | null;
  token?: TokenSource | null;
}

/** What a send() promise resolves with. */
export interface SendResult {
  operationId: string;
  /** The server's ACK, or null when the event settled on being written (a server without ACKs, or ack: false). */
  ack: AckMessage | null;
}

/**
 * The error a send() promise rejects with: refused by the server (with the
 * ERROR's code), dropped from the full offline queue, or the client closed.
 */
export interface SendError extends Error {
  code?: ErrorCode;
}

/** Options of one send(). */
export interface SendOptions {
  /** The event's id (a unique one by default); a retry with the same id is not delivered twice. */
  operationId?: string;
}

/** A payload a client may send: a JSON object (not an array), or null. */
export type SendPayload<P> = P extends readonly unknown[] ? never : P;

/** A function that removes the handler on() added. */
export type Unsubscribe = () => void;

/**
 * A reconnecting client for one server.  Create it, register handlers with
 * on(), call connect(), then join rooms and send events; everything may be
 * called before the connection is open.
 */
export declare class HappyRobotClient {
  /**
   * @param url the WebSocket URL, e.g. "wss://rt.example.com/ws"; null or
   *   undefined: the `/ws` of the server that served client.js.
   */
  constructor(url: string | null | undefined, options: HappyRobotClientOptions);
  /** Connect to the `/ws` of the server that served client.js. */
  constructor(options: HappyRobotClientOptions);

  /** The WebSocket URL. */
  readonly url: string;
  /** The user id (change it with setUser()). */
  readonly userId: string | null | undefined;
  /** The user info (change it with setUser()). */
  readonly userInfo: UserInfo | null | undefined;
  /** The token or token function (change it with setUser()). */
  readonly token: TokenSource | null | undefined;
  readonly baseMs: number;
  readonly maxMs: number;
  readonly maxQueue: number;
  readonly ack: AckMode;
  readonly WebSocket: WebSocketConstructor;
  readonly random: () => number;
  /** The id the server gave the current connection (CONNECTION_ESTABLISHED). */
  readonly clientId: string | null;

  /** "connecting", "open", "reconnecting" or "closed". */
  get state(): ConnectionState;
  /** The rooms this client is in (and joins again after reconnecting). */
  get rooms(): string[];
  /** How many events wait for a connection. */
  get queued(): number;

  /** Start connecting (and reconnecting, until close()); resolves once open and every room joined. */
  connect(): Promise<void>;
  /** Close for good: no reconnection; queued events are rejected. */
  close(): void;
  /** Change the user or pass a fresh token; sent at once when connected, and after every reconnection. */
  setUser(user?: UserUpdate): void;
  /** Join a room now (when connected) and after every reconnection. */
  join(projectId: string): void;
  /** Leave a room and forget it. */
  leave(projectId: string): void;
  /**
   * Send an event to the other members of a room; while offline it waits in
   * the queue.  Rejects with a {@link SendError}.
   */
  send<P extends object>(
    type: EventType,
    projectId: string,
    payload?: SendPayload<P> | null,
    options?: SendOptions,
  ): Promise<SendResult>;

  /** The client's own events: "state", "dropped", "disconnect", "rejoin", "revoked", "terminated". */
  on<K extends keyof ClientEventMap>(type: K, handler: (event: ClientEventMap[K]) => void): Unsubscribe;
  /** The protocol's own messages: "USER_PRESENCE", "ERROR", "ACK", ... */
  on<K extends keyof ServerMessageMap>(type: K, handler: (message: ServerMessageMap[K]) => void): Unsubscribe;
  /** Every server message. */
  on(type: "*", handler: (message: ServerMessage) => void): Unsubscribe;
  /** A room event by its type ("TASK_UPDATE", ...); annotate the handler's parameter to type the payload. */
  on<T extends string, P extends object = Payload>(
    type: RoomEventName<T>,
    handler: (message: RoomEvent<T, P>) => void,
  ): Unsubscribe;

  /** Remove a handler added with on(). */
  off(type: string, handler: (value: never) => void): void;
}

/** The same as `new HappyRobotClient(url, options)`. */
export declare function createClient(
  url: string | null | undefined,
  options: HappyRobotClientOptions,
): HappyRobotClient;
/** The same as `new HappyRobotClient(options)`. */
export declare function createClient(options: HappyRobotClientOptions): HappyRobotClient;

export default HappyRobotClient;
