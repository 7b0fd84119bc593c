/**
 * The "Warm pool" section of the snapshots panel: the host's warm pools (ready sandboxes per
 * kernelspec, memory they hold, when an idle pool expires), from
 * `GET /sandbox-kernels/api/pool`. Refreshed while visible.
 *
 * Stable DOM for tests: `#sk-pool-section` with `data-state` (`loading`, `off`, `ready`,
 * `error`), rows `.sk-pool-row[data-kernel-name]`.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { ApiError, describeError } from './api';
import { formatSize } from './format';

/** One warm pool, as the server reports it. */
export interface IPool {
  runtime: string;
  kernel_name: string;
  target: number;
  ready: number;
  starting: number;
  memory_bytes: number | null;
  idle_expires_in: number | null;
}

/** `GET /sandbox-kernels/api/pool`. */
export interface IPoolReport {
  running: boolean;
  pools: IPool[];
}

/** Milliseconds between refreshes while the section is visible. */
const REFRESH_MS = 5000;

/** "in 9 min" / "in 40 s" / "" for an idle expiry in seconds. */
export function formatExpiry(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds)) {
    return '';
  }
  const s = Math.max(0, Math.round(seconds));
  return s >= 120 ? `idle expiry in ${Math.round(s / 60)} min` : `idle expiry in ${s} s`;
}

/** The text of one pool's row: "Python (NixOS VM): 1/1 ready · 612 MB · idle expiry in 9 min". */
export function describePool(pool: IPool, displayName: string): string {
  const parts = [`${displayName || pool.kernel_name}: ${pool.ready}/${pool.target} ready`];
  if (pool.starting) {
    parts[0] += `, ${pool.starting} starting`;
  }
  if (pool.memory_bytes) {
    parts.push(formatSize(pool.memory_bytes));
  }
  const expiry = formatExpiry(pool.idle_expires_in);
  if (expiry) {
    parts.push(expiry);
  }
  return parts.join(' \u00b7 ');
}

export class PoolSection extends Widget {
  static readonly ID = 'sk-pool-section';

  constructor(options: PoolSection.IOptions) {
    super();
    this._settings = options.settings;
    this._displayName = options.displayName;
    this.id = PoolSection.ID;
    this.addClass('sk-PoolSection');
    const heading = document.createElement('h3');
    heading.className = 'sk-pool-heading';
    heading.textContent = 'Warm pool';
    this._message = document.createElement('p');
    this._message.className = 'sk-pool-message';
    this._list = document.createElement('ul');
    this._list.className = 'sk-pool-list';
    this.node.append(heading, this._message, this._list);
    this.node.dataset.state = 'loading';
    this._message.textContent = 'Loading…';
  }

  /** Fetch the pools now and show them. */
  async refresh(): Promise<void> {
    const token = ++this._token;
    try {
      const report = await this._fetch();
      if (token === this._token) {
        this._render(report, '');
      }
    } catch (error) {
      if (token === this._token) {
        this._render(null, describeError(error));
      }
    }
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  protected onAfterShow(): void {
    void this.refresh();
    window.clearInterval(this._timer);
    this._timer = window.setInterval(() => void this.refresh(), REFRESH_MS);
  }

  protected onAfterAttach(): void {
    if (this.isVisible) {
      this.onAfterShow();
    }
  }

  protected onBeforeHide(): void {
    window.clearInterval(this._timer);
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this._timer);
  }

  private async _fetch(): Promise<IPoolReport> {
    const url = URLExt.join(this._settings.baseUrl, 'sandbox-kernels/api/pool');
    const response = await ServerConnection.makeRequest(url, { method: 'GET' }, this._settings);
    const text = await response.text();
    let data: any = undefined;
    try {
      data = text ? JSON.parse(text) : undefined;
    } catch {
      data = undefined;
    }
    if (!response.ok) {
      const message = data && typeof data.message === 'string' ? data.message : '';
      throw new ApiError(response.status, message || `${response.status} error`);
    }
    return data as IPoolReport;
  }

  private _render(report: IPoolReport | null, error: string): void {
    const pools = report?.pools ?? [];
    const state = error ? 'error' : report?.running && pools.length ? 'ready' : 'off';
    this.node.dataset.state = state;
    this._message.textContent = error
      ? `Warm pool status unavailable: ${error}`
      : state === 'off'
        ? 'No warm pool on this host (NIXOS_VM_POOL_SIZE, SANDBOX_DOCKER_POOL_SIZE).'
        : '';
    this._message.hidden = state === 'ready';
    this._list.replaceChildren(
      ...pools.map(pool => {
        const row = document.createElement('li');
        row.className = 'sk-pool-row';
        row.dataset.kernelName = pool.kernel_name;
        row.dataset.ready = String(pool.ready);
        row.textContent = describePool(pool, this._displayName(pool.kernel_name));
        row.title = `${pool.kernel_name} (${pool.runtime})`;
        return row;
      })
    );
  }

  private _settings: ServerConnection.ISettings;
  private _displayName: (kernelName: string) => string;
  private _message: HTMLParagraphElement;
  private _list: HTMLUListElement;
  private _timer = 0;
  private _token = 0;
}

export namespace PoolSection {
  export interface IOptions {
    settings: ServerConnection.ISettings;
    /** The display name of a kernelspec, '' when unknown. */
    displayName: (kernelName: string) => string;
  }
}
