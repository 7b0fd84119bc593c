/**
 * Kernel start progress in the status bar, and start errors as notifications.
 *
 * The server extension emits one `kernel-start` event per phase of a sandbox kernel's start
 * (see `jupyter_server_ext/event_schemas/kernel-start.yaml`); JupyterLab receives them on its
 * event stream (`/api/events/subscribe`). The status item shows the phase of the start that
 * moved last, with its elapsed time ticking, and clears itself shortly after the kernel is
 * ready. A failed start shows the provisioner's own message, in the item and as an error
 * notification.
 */
import { Notification, showErrorMessage } from '@jupyterlab/apputils';
import type { Event } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

/** The `$id` of the server extension's schema. */
export const START_SCHEMA_ID =
  'https://events.sandbox-kernels.org/jupyter_server_ext/kernel-start/v1';

/** One phase of a kernel's start, as the server emits it. */
export interface IStartEvent {
  kernel_id: string;
  kernel_name: string;
  runtime: string;
  phase: string;
  message: string;
  elapsed: number;
  queue_position: number | null;
}

/** Whether an emission from the server's event stream is a kernel-start event. */
export function isStartEvent(emission: Event.Emission): boolean {
  return (
    emission.schema_id === START_SCHEMA_ID &&
    typeof emission.kernel_id === 'string' &&
    typeof emission.phase === 'string' &&
    typeof emission.message === 'string'
  );
}

/** Milliseconds the item stays after a kernel is ready, and after a failure. */
const READY_LINGER_MS = 2500;
const FAILED_LINGER_MS = 30000;
/** How long the notification's message may be (JupyterLab truncates at 140). */
const NOTIFICATION_CHARS = 130;

/** The elapsed time as the item shows it: "2.1 s". */
export function formatElapsed(seconds: number): string {
  return `${Math.max(0, seconds).toFixed(1)} s`;
}

/**
 * The status bar item. Stable DOM for tests: `#sk-start-status` with `data-phase` and
 * `data-kernel-id`, the text in `.sk-start-text`, the time in `.sk-start-elapsed`.
 */
export class StartStatus extends Widget {
  static readonly ID = 'sk-start-status';

  constructor(options: StartStatus.IOptions) {
    super();
    this._displayName = options.displayName;
    this.id = StartStatus.ID;
    this.addClass('sk-StartStatus');
    this.node.setAttribute('role', 'status');
    this.node.setAttribute('aria-live', 'polite');
    this._text = document.createElement('span');
    this._text.className = 'sk-start-text';
    this._elapsed = document.createElement('span');
    this._elapsed.className = 'sk-start-elapsed';
    this.node.append(this._text, this._elapsed);
    this.node.addEventListener('click', () => this._showDetails());
    this._render();
  }

  /** The start shown now (null when the item is empty). */
  get current(): IStartEvent | null {
    return this._current;
  }

  /** Take one phase event; returns whether it was a failure. */
  handle(event: IStartEvent): boolean {
    this._current = event;
    this._receivedAt = performance.now();
    window.clearTimeout(this._clearTimer);
    window.clearInterval(this._ticker);
    const done = event.phase === 'ready' || event.phase === 'failed';
    if (!done) {
      this._ticker = window.setInterval(() => this._renderElapsed(), 100);
    } else {
      const linger = event.phase === 'ready' ? READY_LINGER_MS : FAILED_LINGER_MS;
      this._clearTimer = window.setTimeout(() => this._clear(event), linger);
    }
    this._render();
    if (event.phase === 'failed') {
      this._notify(event);
      return true;
    }
    return false;
  }

  dispose(): void {
    window.clearTimeout(this._clearTimer);
    window.clearInterval(this._ticker);
    super.dispose();
  }

  /** The line shown for an event: "Python (NixOS VM): restoring the VM…". */
  describe(event: IStartEvent): string {
    const name = this._displayName(event.kernel_name) || event.kernel_name;
    switch (event.phase) {
      case 'ready':
        return `${name}: ready`;
      case 'failed':
        return `${name} failed to start: ${event.message}`;
      default:
        return `${name}: ${event.message}…`;
    }
  }

  private _clear(event: IStartEvent): void {
    if (this._current === event) {
      this._current = null;
      this._render();
    }
  }

  private _seconds(): number {
    const event = this._current;
    if (!event) {
      return 0;
    }
    const done = event.phase === 'ready' || event.phase === 'failed';
    const since = done ? 0 : (performance.now() - this._receivedAt) / 1000;
    return event.elapsed + since;
  }

  private _render(): void {
    const event = this._current;
    this.node.hidden = event === null;
    this.node.dataset.phase = event?.phase ?? '';
    this.node.dataset.kernelId = event?.kernel_id ?? '';
    this.node.classList.toggle('sk-mod-failed', event?.phase === 'failed');
    this._text.textContent = event ? this.describe(event) : '';
    this.node.title = event
      ? `${event.kernel_name} (${event.runtime}), kernel ${event.kernel_id}` +
        (event.phase === 'failed' ? ': click for the whole message' : '')
      : '';
    this._renderElapsed();
  }

  private _renderElapsed(): void {
    this._elapsed.textContent = this._current ? formatElapsed(this._seconds()) : '';
  }

  private _notify(event: IStartEvent): void {
    const line = this.describe(event);
    const short =
      line.length > NOTIFICATION_CHARS ? `${line.slice(0, NOTIFICATION_CHARS - 1)}…` : line;
    Notification.error(short, {
      autoClose: false,
      actions: [
        {
          label: 'Details',
          caption: 'Show the whole message',
          callback: () => void this._showDetails(event)
        }
      ]
    });
  }

  private async _showDetails(event: IStartEvent | null = this._current): Promise<void> {
    if (event?.phase !== 'failed') {
      return;
    }
    const name = this._displayName(event.kernel_name) || event.kernel_name;
    await showErrorMessage(`${name} failed to start`, event.message);
  }

  private _displayName: (kernelName: string) => string;
  private _text: HTMLSpanElement;
  private _elapsed: HTMLSpanElement;
  private _current: IStartEvent | null = null;
  private _receivedAt = 0;
  private _ticker = 0;
  private _clearTimer = 0;
}

export namespace StartStatus {
  export interface IOptions {
    /** The display name of a kernelspec ("Python (NixOS VM)"), '' when unknown. */
    displayName: (kernelName: string) => string;
  }
}
