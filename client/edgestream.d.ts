// Type declarations of /edgestream.js (the edgestream browser client).

export interface EventDetail { org: string; seq: number; ts: number; data: unknown }
export interface ResetDetail { org: string; epoch: string; head: number }
export interface StatusDetail {
  state: 'connected' | 'reconnecting' | 'failed' | 'closed';
  transport: 'webtransport' | 'websocket' | null;
  reason: string;
}
export interface PresenceChange { user: string; joined: boolean }
export interface PresenceDetail {
  org: string;
  /** Empty for the org itself. */
  room: string;
  /** Users present now. */
  online: number;
  /** The users whose presence changed since the previous frame (a snapshot: everyone, as
   * joined); empty above the server's member limit. */
  changes: PresenceChange[];
  /** The first frame of the group on this connection: it replaces the previous view. */
  snapshot: boolean;
  /** The members now (sorted), or null above the member limit. */
  members: string[] | null;
}

export interface HeartbeatDetail { ts: number; heads: Record<string, number> }
export interface ErrorDetail { code: number; message: string }

export interface EdgeStreamOptions {
  /** HTTP base URL of the server, e.g. 'http://127.0.0.1:8080'. */
  server: string;
  token: string;
  orgs?: string[];
  transport?: 'auto' | 'webtransport' | 'websocket';
  /** Called after a 4009 close (token expired) for a fresh token. */
  refreshToken?: () => Promise<string>;
  /** How long a WebTransport session may take to open, and then to deliver its first frame,
   * before the client falls back to WebSocket (ms, default 4000; the second wait is at least
   * 2.5 heartbeat intervals). */
  webTransportTimeoutMs?: number;
  /** Receive the presence of the subscribed orgs (`presence=1`); rooms joined are heard either way. */
  presence?: boolean;
}

export declare class EdgeStreamClient extends EventTarget {
  constructor(options: EdgeStreamOptions);
  /** The transport in use. */
  readonly transport: 'webtransport' | 'websocket' | null;
  /** The last position delivered per org. */
  readonly positions: Record<string, { epoch: string; seq: number }>;
  readonly stats: { connects: number; reconnects: number; events: number; heartbeats: number };
  connect(): Promise<void>;
  setToken(token: string): void;
  subscribe(org: string): void;
  /** Joins a room of an org; kept across reconnects. */
  join(org: string, room: string): void;
  leave(org: string, room: string): void;
  /** Uploads a file over WebTransport when connected through it, else HTTP; resolves when stored. */
  upload(org: string, file: Blob & { name?: string }, o?: { onProgress?: (received: number, size: number) => void }): Promise<{ id: string; size: number; sha256: string }>;
  /** Sends a chat message (any JSON value); resolves with its seq in the org. */
  chat(org: string, room: string, body: unknown, timeoutMs?: number): Promise<number>;
  unsubscribe(org: string): void;
  /** Who is present in an org (room '') or a room, as the frames told it; members is null
   * above the server's member limit; null when nothing was heard of the group. */
  members(org: string, room?: string): { online: number; members: string[] | null } | null;
  /** Drops the current connection and resumes with `since`. */
  reconnect(): void;
  close(): void;
  addEventListener(type: 'event', listener: (e: CustomEvent<EventDetail>) => void): void;
  addEventListener(type: 'reset', listener: (e: CustomEvent<ResetDetail>) => void): void;
  addEventListener(type: 'status', listener: (e: CustomEvent<StatusDetail>) => void): void;
  addEventListener(type: 'heartbeat', listener: (e: CustomEvent<HeartbeatDetail>) => void): void;
  /** A presence batch or snapshot of an org (room "") or one of its rooms (PROTOCOL.md section 8). */
  addEventListener(type: 'presence', listener: (e: CustomEvent<PresenceDetail>) => void): void;
  addEventListener(type: 'error', listener: (e: CustomEvent<ErrorDetail>) => void): void;
}

export declare function brotliSupported(): boolean;
