#!/usr/bin/env node
// The benchmark's Node.js reference peer: the v1 protocol of docs/PROTOCOL.md on
// Node.js and the `ws` package, shaped like the original Node server this project
// replaces. Like that server it serialises a relayed message once per recipient
// and sends the whole presence list to the room after every join and leave (no
// coalescing, no history, no rate limit, no origin check, no logging); it pings
// every connection every 30 s, as the original did.
//
//   (cd bench && npm ci) && PORT=3001 node bench/peers/node_server.mjs
//
// WebSocket /ws: CONNECTION_ESTABLISHED, SET_USER, JOIN_PROJECT, LEAVE_PROJECT,
// USER_PRESENCE and the seven relayed event types; ERROR for what it cannot act on.
// HTTP: GET /health, GET /stats, POST /broadcast.
import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { WebSocketServer } from 'ws';

const PORT = Number(process.env.PORT || 3001);
const HOST = process.env.HOST || '0.0.0.0';
const EVENT_TYPES = new Set(['TASK_CREATE', 'TASK_UPDATE', 'TASK_DELETE',
  'COMMENT_CREATE', 'COMMENT_UPDATE', 'COMMENT_DELETE', 'PROJECT_UPDATE']);
const started = Date.now();

class Connection {
  constructor(socket) {
    this.socket = socket;
    this.clientId = `client_${Date.now()}_${randomBytes(6).toString('hex')}`;
    this.userId = null;
    this.userInfo = null;
    this.rooms = new Map(); // projectId -> joinedAt
  }

  send(message) {
    if (this.socket.readyState === 1) this.socket.send(JSON.stringify(message));
  }

  error(text, code, operationId) {
    const message = { type: 'ERROR', error: text, code, timestamp: Date.now() };
    if (typeof operationId === 'string') message.operationId = operationId;
    this.send(message);
  }
}

const connections = new Set();
const rooms = new Map(); // projectId -> Set<Connection>, in join order

function initials(info, userId) {
  const first = (s) => s.charAt(0);
  if (info && info.firstName && info.lastName) return (first(info.firstName) + first(info.lastName)).toUpperCase();
  if (info && info.name) {
    const words = info.name.trim().split(/\s+/);
    return (words.length > 1 ? first(words[0]) + first(words[words.length - 1]) : first(words[0])).toUpperCase();
  }
  if (info && info.email) return info.email.split('@')[0].slice(0, 2).toUpperCase();
  return String(userId).slice(-2).toUpperCase();
}

// Each recipient gets its own JSON.stringify, as in the original server.
function sendToRoom(projectId, message, except = null) {
  const members = rooms.get(projectId);
  if (!members) return 0;
  let sent = 0;
  for (const member of members) {
    if (member !== except) { member.send(message); sent++; }
  }
  return sent;
}

function announcePresence(projectId) {
  const members = rooms.get(projectId);
  if (!members) return;
  const activeUsers = [...members].map((c) => ({
    userId: c.userId, clientId: c.clientId, joinedAt: c.rooms.get(projectId),
    initials: initials(c.userInfo, c.userId) }));
  const now = Date.now();
  sendToRoom(projectId, { type: 'USER_PRESENCE',
    payload: { projectId, activeUsers, userCount: activeUsers.length },
    operationId: `presence-${now}`, timestamp: now });
}

function leave(conn, projectId) {
  if (!conn.rooms.delete(projectId)) return;
  const members = rooms.get(projectId);
  members.delete(conn);
  if (members.size === 0) rooms.delete(projectId);
  else announcePresence(projectId);
}

function handle(conn, msg) {
  const { type, projectId, operationId } = msg;
  if (type === 'SET_USER') {
    const userId = (msg.payload && msg.payload.userId) || msg.userId;
    if (!userId) return conn.error('userId is required', 'MISSING_USER_ID');
    conn.userId = String(userId);
    conn.userInfo = (msg.payload && msg.payload.userInfo) || null;
    for (const room of conn.rooms.keys()) announcePresence(room);
  } else if (type === 'JOIN_PROJECT' || type === 'LEAVE_PROJECT') {
    if (typeof projectId !== 'string' || !projectId) {
      return conn.error('projectId is required', 'MISSING_PROJECT_ID', operationId);
    }
    if (type === 'LEAVE_PROJECT') return leave(conn, projectId);
    if (msg.userId) conn.userId = String(msg.userId);
    if (!conn.userId) return conn.error('Send SET_USER first', 'NOT_IDENTIFIED', operationId);
    if (!conn.rooms.has(projectId)) {
      conn.rooms.set(projectId, Date.now());
      if (!rooms.has(projectId)) rooms.set(projectId, new Set());
      rooms.get(projectId).add(conn);
    }
    announcePresence(projectId);
  } else if (EVENT_TYPES.has(type)) {
    if (typeof projectId !== 'string' || !projectId) {
      return conn.error('projectId is required', 'MISSING_PROJECT_ID', operationId);
    }
    if (!conn.rooms.has(projectId)) return conn.error('Join the project first', 'NOT_IN_PROJECT', operationId);
    sendToRoom(projectId, { type, payload: msg.payload, operationId, timestamp: Date.now() }, conn);
  } else {
    conn.error(`Unknown message type: ${type}`, 'UNKNOWN_TYPE', operationId);
  }
}

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

function broadcast(req, res) {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    let body;
    try { body = JSON.parse(Buffer.concat(chunks).toString('utf8')); } catch {
      return reply(res, 400, { error: 'Invalid JSON' });
    }
    if (!body || !body.type || !body.projectId) {
      return reply(res, 400, { error: 'Missing required fields: type, projectId' });
    }
    const now = Date.now();
    const clientCount = sendToRoom(body.projectId, { type: body.type, payload: body.payload,
      operationId: body.operationId || `broadcast-${now}`, timestamp: body.timestamp || now,
      userId: body.userId || null });
    reply(res, 200, { success: true, message: 'Broadcast sent', projectId: body.projectId, clientCount });
  });
}

const server = http.createServer((req, res) => {
  const path = (req.url || '/').split('?')[0];
  if (req.method === 'GET' && path === '/health') {
    reply(res, 200, { status: 'healthy', timestamp: Date.now(), clients: connections.size,
      projects: rooms.size, uptime: (Date.now() - started) / 1000 });
  } else if (req.method === 'GET' && path === '/stats') {
    const projectStats = {};
    for (const [id, members] of rooms) {
      projectStats[id] = { clientCount: members.size, clients: [...members].map((c) => c.clientId) };
    }
    reply(res, 200, { totalClients: connections.size, totalProjects: rooms.size, projectStats });
  } else if (req.method === 'POST' && path === '/broadcast') {
    broadcast(req, res);
  } else {
    reply(res, 404, { error: 'Not found' });
  }
});

const wss = new WebSocketServer({ server, path: '/ws' });
wss.on('connection', (socket) => {
  const conn = new Connection(socket);
  connections.add(conn);
  conn.send({ type: 'CONNECTION_ESTABLISHED', clientId: conn.clientId, timestamp: Date.now() });
  socket.on('message', (data, isBinary) => {
    if (isBinary) return conn.error('Binary messages are not supported', 'BINARY_NOT_SUPPORTED');
    let msg;
    try { msg = JSON.parse(data.toString('utf8')); } catch {
      return conn.error('Invalid message format', 'INVALID_JSON');
    }
    if (!msg || typeof msg !== 'object' || Array.isArray(msg)) {
      return conn.error('Invalid message format', 'INVALID_MESSAGE');
    }
    handle(conn, msg);
  });
  // Like the original server: a WebSocket ping every 30 s.
  const pinger = setInterval(() => socket.ping(), 30000);
  socket.on('close', () => {
    clearInterval(pinger);
    connections.delete(conn);
    for (const room of [...conn.rooms.keys()]) leave(conn, room);
  });
  socket.on('error', () => {});
});

server.listen(PORT, HOST);
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const conn of connections) conn.socket.terminate();
    process.exit(0);
  });
}
