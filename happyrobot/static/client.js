/**
 * Happy Robot browser client: a small, dependency-free ES module for the
 * real-time server's WebSocket protocol (docs/PROTOCOL.md).
 *
 * The server serves this file at GET /client.js.  It connects, names its
 * user (SET_USER, with the session token when one is given), remembers the
 * rooms it joined and joins them again after every reconnection, reconnects
 * forever with capped exponential backoff and full jitter, and queues the
 * events sent while it is offline (bounded) to send them once the rooms are
 * joined again.
 *
 *   import { HappyRobotClient } from "http://localhost:3001/client.js";
 *   const client = new HappyRobotClient("ws://localhost:3001/ws", { userId: "user_1" });
 *   client.on("state", ({ state }) => badge.textContent = state);
 *   client.on("TASK_UPDATE", (event) => applyTask(event.payload));
 *   client.connect();
 *   client.join("p1");
 *   await client.send("TASK_UPDATE", "p1", { id: "t1", title: "New" });
 *
 * Events handed to on(): every server message by its `type` (upper case,
 * e.g. "TASK_UPDATE", "USER_PRESENCE", "ERROR"), "*" for every server
 * message, and the client's own lower-case events: "state", "dropped",
 * "disconnect", "rejoin", "revoked" (the server took the client out of a
 * room, ERROR ACCESS_REVOKED: it is not joined again) and "terminated"
 * (the server closed the connection with CLOSE_USER_DISCONNECTED: the
 * client does not reconnect).  See docs/clients.md, "Browser client".
 *
 * Delivery: the server ignores fields it does not know, so the client may
 * always send them.  Every join carries `since`: 0 the first time (a server
 * with event history, protocol v2, answers with RESYNC_REQUIRED naming the
 * room's current seq, which the client keeps and does not pass on), then
 * the last seq seen, so a rejoin after a reconnection replays exactly what
 * was missed; a replayed event whose `seq` was already seen is dropped.
 * Every event is sent with `"ack": true`; once the server has answered one
 * with an ACK, send() promises settle on the ACK (or on an ERROR naming the
 * event's operationId), and an event written but not acknowledged when the
 * connection drops is sent again after reconnecting (the server recognises
 * the retry and does not deliver it twice).  With a server that sends no
 * ACKs (v1), send() resolves when the event was written to the socket.
 */

/** The connection states, in the order a connection normally goes through them. */
export const STATES = Object.freeze(["connecting", "open", "reconnecting", "closed"]);

/**
 * (v2) The close code of a server-side disconnect of the user (the operator
 * API): final, the client closes for good instead of reconnecting.
 */
export const CLOSE_USER_DISCONNECTED = 4403;

const DEFAULT_BASE_MS = 500;
const DEFAULT_MAX_MS = 30000;
const DEFAULT_MAX_QUEUE = 1000;
// A connection must stay open this long before the backoff starts again
// from the beginning, so that a server that accepts and at once closes
// (a refused token, a full room) is not hammered at the base delay.
const STABLE_CONNECTION_MS = 2000;

let operationCounter = 0;

/** A unique operation id, when the caller gives none. */
function newOperationId() {
  operationCounter += 1;
  const random =
    globalThis.crypto && typeof globalThis.crypto.randomUUID === "function"
      ? globalThis.crypto.randomUUID().slice(0, 8)
      : Math.random().toString(36).slice(2, 10);
  return `op-${Date.now().toString(36)}-${random}-${operationCounter}`;
}

/** The WebSocket URL of the server that served this module (`/ws` beside `/client.js`). */
function defaultUrl() {
  const url = new URL("/ws", import.meta.url);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/**
 * A reconnecting client for one server.  Create it, register handlers with
 * on(), call connect(), then join rooms and send events; everything may be
 * called before the connection is open.
 */
export class HappyRobotClient {
  /**
   * @param {string} [url] the WebSocket URL, e.g. "wss://rt.example.com/ws";
   *   by default the `/ws` of the server that served this module.
   * @param {object} options
   * @param {string} [options.userId] the user id sent in SET_USER.
   * @param {object} [options.userInfo] firstName, lastName, name, email...
   * @param {string|function(): (string|Promise<string>)} [options.token] a
   *   session token, or a function called before every (re)connection that
   *   returns a fresh one.  userId or token is required.
   * @param {{baseMs?: number, maxMs?: number}} [options.reconnect] backoff:
   *   attempt n waits a random time between 0 and min(maxMs, baseMs * 2^n).
   * @param {number} [options.maxQueue] events kept while offline (1000); when
   *   full the oldest is dropped and a "dropped" event emitted.
   * @param {"auto"|boolean} [options.ack] "auto" (default): wait for ACKs once
   *   the server has sent one; true: always wait for the ACK; false: never
   *   ask for ACKs, settle on write.
   * @param {function} [options.WebSocket] the WebSocket class (for Node or tests).
   * @param {function(): number} [options.random] a source of numbers in [0, 1)
   *   for the jitter (Math.random).
   */
  constructor(url, options = {}) {
    if (url !== undefined && url !== null && typeof url === "object") {
      options = url;
      url = undefined;
    }
    this.url = url || defaultUrl();
    const scheme = new URL(this.url).protocol;
    if (scheme !== "ws:" && scheme !== "wss:") {
      throw new TypeError(`HappyRobotClient needs a ws: or wss: URL, got ${this.url}`);
    }
    if (!options.userId && !options.token) {
      throw new TypeError("HappyRobotClient needs a userId or a token");
    }
    this.userId = options.userId;
    this.userInfo = options.userInfo;
    this.token = options.token;
    const reconnect = options.reconnect || {};
    this.baseMs = reconnect.baseMs ?? DEFAULT_BASE_MS;
    this.maxMs = reconnect.maxMs ?? DEFAULT_MAX_MS;
    this.maxQueue = options.maxQueue ?? DEFAULT_MAX_QUEUE;
    this.ack = options.ack ?? "auto";
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.random = options.random || Math.random;
    /** The id the server gave the current connection (CONNECTION_ESTABLISHED). */
    this.clientId = null;

    this._state = "closed";
    this._handlers = new Map();
    this._rooms = new Set();
    this._lastSeq = new Map(); // projectId -> highest seq seen (v2 servers only)
    this._queue = []; // events waiting for an open connection, oldest first
    this._unacked = new Map(); // operationId -> item written, ACK awaited
    this._acksSeen = false;
    this._ws = null;
    this._generation = 0; // bumped per socket, so stale callbacks do nothing
    this._attempt = 0;
    this._timer = null;
    this._openedAt = 0;
    this._waiters = []; // connect() promises waiting for "open"
    this._onOnline = () => {
      if (this._state === "reconnecting" && this._timer !== null) {
        clearTimeout(this._timer);
        this._timer = null;
        this._open();
      }
    };
  }

  /** "connecting", "open", "reconnecting" or "closed". */
  get state() {
    return this._state;
  }

  /** The rooms this client is in (and joins again after reconnecting). */
  get rooms() {
    return [...this._rooms];
  }

  /** How many events wait for a connection. */
  get queued() {
    return this._queue.length;
  }

  /**
   * Start connecting (and reconnecting, until close()).
   * @returns {Promise<void>} resolves once the connection is open and every
   *   room joined.
   */
  connect() {
    if (this._state === "open") {
      return Promise.resolve();
    }
    const opened = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    if (this._state === "closed") {
      if (typeof globalThis.addEventListener === "function") {
        globalThis.addEventListener("online", this._onOnline);
      }
      this._setState("connecting");
      this._open();
    }
    return opened;
  }

  /** Close the connection for good: no reconnection; queued events are rejected. */
  close() {
    if (this._state === "closed") {
      return;
    }
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
    }
    clearTimeout(this._timer);
    this._timer = null;
    this._generation += 1;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000, "Client closed");
      } catch (e) {
        // Already closing: nothing to do.
      }
    }
    const error = new Error("The client was closed");
    for (const item of [...this._unacked.values(), ...this._queue]) {
      item.reject(error);
    }
    this._unacked.clear();
    this._queue = [];
    this._setState("closed");
    for (const waiter of this._waiters.splice(0)) {
      waiter.reject(error);
    }
  }

  /**
   * Change the user (or pass a fresh token before the old one expires); sent
   * at once when connected, and after every reconnection.
   */
  setUser({ userId, userInfo, token } = {}) {
    if (userId !== undefined) this.userId = userId;
    if (userInfo !== undefined) this.userInfo = userInfo;
    if (token !== undefined) this.token = token;
    if (this._state === "open") {
      this._identify(this._generation);
    }
  }

  /** Join a room now (when connected) and after every reconnection. */
  join(projectId) {
    checkId("projectId", projectId);
    if (this._rooms.has(projectId)) {
      return;
    }
    this._rooms.add(projectId);
    if (this._state === "open") {
      this._write(this._joinMessage(projectId));
    }
  }

  /** Leave a room and forget it. */
  leave(projectId) {
    if (!this._rooms.delete(projectId)) {
      return;
    }
    this._lastSeq.delete(projectId);
    if (this._state === "open") {
      this._write({ type: "LEAVE_PROJECT", projectId });
    }
  }

  /**
   * Send an event (TASK_UPDATE, COMMENT_CREATE, ...) to the other members of
   * a room.  While offline it waits in the queue.
   * @returns {Promise<{operationId: string, ack: object|null}>} resolves with
   *   the server's ACK when the server acknowledges events, otherwise (ack
   *   null) once written to the socket; rejects when the event is dropped
   *   from a full queue, refused by the server with an ERROR (only with
   *   ACKs) or the client is closed first.
   */
  send(type, projectId, payload, { operationId } = {}) {
    if (typeof type !== "string" || !type) {
      throw new TypeError("send() needs an event type");
    }
    checkId("projectId", projectId);
    const message = { type, projectId, operationId: operationId || newOperationId() };
    if (payload !== undefined) {
      message.payload = payload;
    }
    if (this.ack !== false) {
      message.ack = true;
    }
    let item;
    const promise = new Promise((resolve, reject) => {
      item = { message, resolve, reject };
    });
    // The promise is also handled here, so that fire-and-forget callers do
    // not get "unhandled rejection" reports for a dropped event.
    promise.catch(() => {});
    // readyState 1 is OPEN: a socket the server has begun to close
    // (CLOSING) would silently discard the event, so it waits instead.
    if (this._state === "open" && this._ws && this._ws.readyState === 1) {
      this._deliver(item);
    } else {
      this._enqueue(item);
    }
    return promise;
  }

  /**
   * Call handler(message) for every message of this type: a server type
   * such as "TASK_UPDATE", "*" for all server messages, or one of the
   * client's events ("state", "dropped", "disconnect", "rejoin", "revoked",
   * "terminated").
   * @returns {function(): void} a function that removes the handler.
   */
  on(type, handler) {
    if (!this._handlers.has(type)) {
      this._handlers.set(type, new Set());
    }
    this._handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  /** Remove a handler added with on(). */
  off(type, handler) {
    const handlers = this._handlers.get(type);
    if (handlers) {
      handlers.delete(handler);
    }
  }

  // ------------------------------------------------------------- internals

  _emit(type, value) {
    const handlers = this._handlers.get(type);
    if (!handlers) {
      return;
    }
    for (const handler of [...handlers]) {
      try {
        handler(value);
      } catch (error) {
        // One broken handler must not stop the others or the client:
        // report it as an uncaught error, outside this call stack.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }

  _setState(state, detail = {}) {
    const previous = this._state;
    if (previous === state) {
      return;
    }
    this._state = state;
    this._emit("state", { state, previous, ...detail });
  }

  _open() {
    this._timer = null;
    const generation = ++this._generation;
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (error) {
      this._closed(generation, { code: 1006, reason: String(error), wasClean: false });
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (generation === this._generation) {
        this._openedAt = Date.now();
        this._resume(generation);
      }
    };
    ws.onmessage = (event) => {
      if (generation === this._generation) {
        this._received(event.data);
      }
    };
    ws.onclose = (event) => this._closed(generation, event);
    // An "error" event is always followed by "close", which does the work.
    ws.onerror = () => {};
  }

  async _resume(generation) {
    // Name the user first, then join every room, then send what waited:
    // the server handles a connection's messages in the order they were
    // sent, so the events arrive after the joins have taken effect.
    if (!(await this._identify(generation))) {
      return;
    }
    for (const projectId of this._rooms) {
      this._write(this._joinMessage(projectId));
      this._emit("rejoin", { projectId, since: this._lastSeq.get(projectId) ?? null });
    }
    const waiting = this._queue;
    this._queue = [];
    for (const item of waiting) {
      this._deliver(item);
    }
    this._setState("open");
    for (const waiter of this._waiters.splice(0)) {
      waiter.resolve();
    }
  }

  async _identify(generation) {
    let token = this.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (error) {
        token = undefined;
      }
    }
    if (generation !== this._generation || !this._ws) {
      return false; // closed while the token was being fetched
    }
    const payload = {};
    if (this.userId) payload.userId = this.userId;
    if (this.userInfo) payload.userInfo = this.userInfo;
    if (token) payload.token = token;
    this._write({ type: "SET_USER", payload });
    return true;
  }

  _joinMessage(projectId) {
    // The first join says since 0: a server with history (v2) answers
    // RESYNC_REQUIRED with the room's current seq, the point a later
    // resume continues from even if no event arrives before a disconnect.
    // (A v1 server ignores the field.)
    const since = this._lastSeq.get(projectId);
    return { type: "JOIN_PROJECT", projectId, since: since ?? 0 };
  }

  _write(message) {
    this._ws.send(JSON.stringify(message));
  }

  _deliver(item) {
    this._write(item.message);
    const waitForAck = this.ack === true || (this.ack === "auto" && this._acksSeen);
    if (waitForAck) {
      this._unacked.set(item.message.operationId, item);
    } else {
      item.resolve({ operationId: item.message.operationId, ack: null });
    }
  }

  _enqueue(item) {
    this._queue.push(item);
    while (this._queue.length > this.maxQueue) {
      const dropped = this._queue.shift();
      dropped.reject(new Error("Dropped from the full offline queue"));
      this._emit("dropped", dropped.message);
    }
  }

  _received(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch (error) {
      return;
    }
    if (message === null || typeof message !== "object" || typeof message.type !== "string") {
      return;
    }
    const { type, projectId, seq, operationId } = message;
    if (type === "CONNECTION_ESTABLISHED") {
      this.clientId = message.clientId;
    } else if (type === "ACK") {
      this._acksSeen = true;
      const item = this._unacked.get(operationId);
      if (item) {
        this._unacked.delete(operationId);
        item.resolve({ operationId, ack: message });
      }
    } else if (type === "ERROR" && operationId !== undefined && this._unacked.has(operationId)) {
      const item = this._unacked.get(operationId);
      this._unacked.delete(operationId);
      const error = new Error(message.error || "Refused by the server");
      error.code = message.code;
      item.reject(error);
    } else if (type === "ERROR" && message.code === "ACCESS_REVOKED" && typeof projectId === "string") {
      // (v2) The server took this client out of the room: it is not joined
      // again (join() again to try, once access is granted again).
      if (this._rooms.delete(projectId)) {
        this._lastSeq.delete(projectId);
        this._emit("revoked", { projectId, reason: message.error || "" });
      }
    } else if (type === "RESYNC_REQUIRED" && Number.isInteger(seq)) {
      const first = !this._lastSeq.has(projectId);
      this._lastSeq.set(projectId, seq);
      if (first) {
        return; // the answer to the first join's since 0: just the starting point
      }
      // History does not reach back far enough (or Redis failed over and
      // lost events this client saw): the application reloads the room
      // from its back end; live events continue from here, numbered above.
    } else if (Number.isInteger(seq) && this._rooms.has(projectId)) {
      const last = this._lastSeq.get(projectId);
      if (last !== undefined && seq <= last) {
        return; // replayed after a reconnection and already seen
      }
      this._lastSeq.set(projectId, seq);
    }
    this._emit(type, message);
    this._emit("*", message);
  }

  _closed(generation, event) {
    if (generation !== this._generation || this._state === "closed") {
      return;
    }
    this._ws = null;
    this._generation += 1; // late events of the old socket are ignored
    const { code, reason, wasClean } = event;
    this._emit("disconnect", { code, reason, wasClean });
    if (code === CLOSE_USER_DISCONNECTED) {
      // (v2) Disconnected by the server for good: no reconnection.
      this._emit("terminated", { code, reason });
      this.close();
      return;
    }
    // Events written but never acknowledged go out again, first; the
    // server recognises them by their operationId.
    if (this._unacked.size) {
      this._queue = [...this._unacked.values(), ...this._queue];
      this._unacked.clear();
      while (this._queue.length > this.maxQueue) {
        const dropped = this._queue.shift();
        dropped.reject(new Error("Dropped from the full offline queue"));
        this._emit("dropped", dropped.message);
      }
    }
    if (this._openedAt && Date.now() - this._openedAt >= STABLE_CONNECTION_MS) {
      this._attempt = 0;
    }
    this._openedAt = 0;
    const ceiling = Math.min(this.maxMs, this.baseMs * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    const delay = Math.floor(this.random() * ceiling); // full jitter
    this._setState("reconnecting", { code, delayMs: delay });
    this._timer = setTimeout(() => this._open(), delay);
  }
}

/** The same as `new HappyRobotClient(url, options)`. */
export function createClient(url, options) {
  return new HappyRobotClient(url, options);
}

function checkId(name, value) {
  if (typeof value !== "string" || !value) {
    throw new TypeError(`${name} must be a non-empty string`);
  }
}

export default HappyRobotClient;
