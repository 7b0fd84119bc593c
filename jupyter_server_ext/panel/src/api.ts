/**
 * Client of the sandbox-kernels REST API served by the `jupyter_server_ext` server extension.
 *
 * Every request goes through `ServerConnection.makeRequest` with the application's server
 * settings, so the token, the XSRF cookie and the base URL are handled as for core requests.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** The path of the API below the server's base URL. */
const API_PATH = 'sandbox-kernels/api';

/** Snapshot names the server accepts; it stays the authority, this is checked for early help. */
export const SNAPSHOT_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

export type SnapshotKind = 'memory' | 'disk' | 'filesystem' | string;

/** One snapshot of a kernel's sandbox. */
export interface ISnapshot {
  name: string;
  /** ISO-8601 time of creation. */
  created: string;
  kind: SnapshotKind;
  /** Bytes, when the runtime knows it. */
  size: number | null;
  keep: boolean;
}

/** `GET kernels/{id}/snapshots`: what the runtime offers and the kernel's snapshots. */
export interface ISnapshotListing {
  kernel_id: string;
  runtime: string;
  /** One line about the sandbox, e.g. a VM's guest OS; empty when there is nothing to say. */
  sandbox?: string;
  kinds: SnapshotKind[];
  default_kind: SnapshotKind;
  /** What rollback means for this runtime, e.g. that memory state is not kept. */
  note: string;
  snapshots: ISnapshot[];
}

/** `POST kernels/{id}/snapshots/{name}/rollback`. */
export interface IRollbackResult {
  name: string;
  kind: SnapshotKind;
  kernel_restarted: boolean;
  seconds: number;
}

/** `GET runtimes`: one report per runtime. */
export interface IRuntimeReport {
  runtime: string;
  kernel_name: string;
  ok: boolean;
  details: string[];
  fixes: string[];
}

/** A request the server answered with an error status (4xx/5xx), with its message. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
    this.name = 'ApiError';
  }

  /** The kernel exists but was not started by a sandbox provisioner (HTTP 409). */
  get notSandboxed(): boolean {
    return this.status === 409;
  }
}

/** Turn any failure of a request into one readable sentence. */
export function describeError(error: unknown): string {
  if (error instanceof ApiError) {
    return error.message;
  }
  if (error instanceof ServerConnection.NetworkError) {
    return `The Jupyter server could not be reached: ${error.message}`;
  }
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}

/** Typed calls to the snapshot API of one Jupyter server. */
export class SnapshotClient {
  constructor(readonly settings: ServerConnection.ISettings) {}

  /** The runtime's capabilities and the kernel's snapshots, oldest first. */
  list(kernelId: string): Promise<ISnapshotListing> {
    return this._request(this._kernelPath(kernelId), { method: 'GET' });
  }

  /** Take a snapshot; the server generates a name when `name` is empty. */
  create(
    kernelId: string,
    options: { name?: string; kind?: SnapshotKind; keep?: boolean } = {}
  ): Promise<ISnapshot> {
    const body: Record<string, unknown> = {};
    if (options.name) {
      body.name = options.name;
    }
    if (options.kind) {
      body.kind = options.kind;
    }
    if (options.keep !== undefined) {
      body.keep = options.keep;
    }
    return this._request(this._kernelPath(kernelId), {
      method: 'POST',
      body: JSON.stringify(body)
    });
  }

  /** Return the kernel's sandbox to snapshot `name`. */
  rollback(kernelId: string, name: string): Promise<IRollbackResult> {
    return this._request(
      this._kernelPath(kernelId, encodeURIComponent(name), 'rollback'),
      { method: 'POST', body: '{}' }
    );
  }

  /** Delete snapshot `name`. */
  async remove(kernelId: string, name: string): Promise<void> {
    await this._request(this._kernelPath(kernelId, encodeURIComponent(name)), {
      method: 'DELETE'
    });
  }

  /** Which runtimes work on this server. */
  runtimes(): Promise<IRuntimeReport[]> {
    return this._request(URLExt.join(API_PATH, 'runtimes'), { method: 'GET' });
  }

  private _kernelPath(kernelId: string, ...rest: string[]): string {
    return URLExt.join(
      API_PATH,
      'kernels',
      encodeURIComponent(kernelId),
      'snapshots',
      ...rest
    );
  }

  private async _request<T>(path: string, init: RequestInit): Promise<T> {
    const url = URLExt.join(this.settings.baseUrl, path);
    const response = await ServerConnection.makeRequest(url, init, this.settings);
    const text = await response.text();
    let data: any = undefined;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = undefined;
      }
    }
    if (!response.ok) {
      throw new ApiError(response.status, errorMessage(response, data));
    }
    return data as T;
  }
}

function errorMessage(response: Response, data: any): string {
  const message = data && typeof data.message === 'string' ? data.message : '';
  if (response.status === 404 && (!message || message === 'Not Found')) {
    return (
      'The sandbox-kernels server extension did not answer (404). Is the package ' +
      'installed in the environment that runs this Jupyter server?'
    );
  }
  return message || `${response.status} ${response.statusText || 'error'}`;
}
