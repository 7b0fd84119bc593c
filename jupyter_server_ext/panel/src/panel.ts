/**
 * The "Sandbox snapshots" sidebar: follows the current notebook's kernel, lists its snapshots,
 * and creates, rolls back and deletes them through the REST API.
 *
 * DOM hooks for tests and themes: the view node `.sk-view[data-state]` (no-notebook, no-kernel,
 * loading, not-sandboxed, unavailable, ready), the header's `.sk-kernel` and `.sk-sandbox`
 * (a VM's guest OS), `#sk-create-name`, `#sk-create-kind`,
 * `#sk-create-keep`, `#sk-create-button`, rows `.sk-snapshot-row[data-name][data-kind]` with
 * `.sk-rollback` and `.sk-delete`, and the status line `.sk-status[data-state]` (idle, busy,
 * done, error).
 */
import { Dialog, ISessionContext, showDialog } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { Kernel } from '@jupyterlab/services';
import {
  caretDownEmptyIcon,
  deleteIcon,
  refreshIcon,
  SidePanel,
  Toolbar,
  ToolbarButton
} from '@jupyterlab/ui-components';
import { ISignal, Signal } from '@lumino/signaling';
import { Panel, Widget } from '@lumino/widgets';

import {
  ApiError,
  describeError,
  ISnapshot,
  ISnapshotListing,
  SNAPSHOT_NAME,
  SnapshotClient
} from './api';
import { formatCreated, formatElapsed, formatSize } from './format';
import { snapshotIcon } from './icon';

/** What the panel can show for the current notebook. */
export type ViewState =
  | 'no-notebook'
  | 'no-kernel'
  | 'loading'
  | 'not-sandboxed'
  | 'unavailable'
  | 'ready';

const NAME_HINT =
  "Use letters, digits, '.', '_' or '-', starting with a letter or digit (at most 63).";

/** How long a rollback waits for the restarted kernel to answer its first request. */
const KERNEL_GREETING_TIMEOUT_MS = 30_000;

/** Kinds whose rollback keeps the kernel's memory (variables survive). */
const MEMORY_KINDS = new Set(['memory']);

/** The sidebar widget. One instance per application. */
export class SnapshotPanel extends SidePanel {
  constructor(options: SnapshotPanel.IOptions) {
    super({ content: new Panel() });
    this._client = options.client;
    this.id = SnapshotPanel.ID;
    this.addClass('sk-SnapshotPanel');
    this.title.icon = snapshotIcon;
    this.title.caption = 'Sandbox snapshots';

    const heading = document.createElement('h2');
    heading.className = 'jp-text-truncated sk-heading';
    heading.textContent = 'Sandbox snapshots';
    this.header.addWidget(new Widget({ node: heading }));

    this._dom = buildView();
    this._refreshButton = new ToolbarButton({
      icon: refreshIcon,
      tooltip: 'Refresh the list of snapshots',
      className: 'sk-refresh',
      onClick: () => void this.refresh()
    });
    this.toolbar.addItem('kernel', new Widget({ node: this._dom.kernel }));
    this.toolbar.addItem('spacer', Toolbar.createSpacerItem());
    this.toolbar.addItem('refresh', this._refreshButton);

    const view = new Widget({ node: this._dom.root });
    view.addClass('sk-view');
    this.addWidget(view);

    this._dom.name.addEventListener('input', () => this._renderForm());
    this._dom.name.addEventListener('keydown', event => {
      if (event.key === 'Enter' && !this._dom.create.disabled) {
        event.preventDefault();
        void this._createFromForm();
      }
    });
    this._dom.create.addEventListener('click', () => void this._createFromForm());
    this._dom.list.addEventListener('click', event => this._onListClick(event));
    this._render();
  }

  /** Emitted when the state, the listing or the busy flag changes (for command enablement). */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The notebook whose kernel the panel follows. */
  get notebook(): NotebookPanel | null {
    return this._notebook;
  }
  set notebook(notebook: NotebookPanel | null) {
    if (notebook === this._notebook) {
      return;
    }
    const old = this._notebook?.sessionContext;
    if (old) {
      old.kernelChanged.disconnect(this._onKernelChanged, this);
      old.statusChanged.disconnect(this._onStatusChanged, this);
    }
    this._notebook?.disposed.disconnect(this._onNotebookDisposed, this);
    this._notebook = notebook;
    this._restarting = false;
    if (!this._busy) {
      this._result = null;
    }
    if (notebook) {
      const context = notebook.sessionContext;
      context.kernelChanged.connect(this._onKernelChanged, this);
      context.statusChanged.connect(this._onStatusChanged, this);
      notebook.disposed.connect(this._onNotebookDisposed, this);
      void context.ready.then(() => {
        if (this._notebook === notebook) {
          void this.refresh();
        }
      });
    }
    void this.refresh();
  }

  /** The id of the followed kernel, if it has one. */
  get kernelId(): string | null {
    return this._notebook?.sessionContext.session?.kernel?.id ?? null;
  }

  /** What the panel shows now. */
  get state(): ViewState {
    return this._state;
  }

  /** The last listing of the followed kernel (null unless `state` is "ready"). */
  get listing(): ISnapshotListing | null {
    return this._listing;
  }

  /** Whether an operation (create, roll back, delete) is running. */
  get busy(): boolean {
    return this._busy !== null;
  }

  /** The newest snapshot of the followed kernel, from the last listing. */
  get latest(): ISnapshot | null {
    const snaps = this._listing?.snapshots ?? [];
    return snaps.reduce<ISnapshot | null>(
      (best, s) => (!best || Date.parse(s.created) >= Date.parse(best.created) ? s : best),
      null
    );
  }

  /** Reload the followed kernel's listing. */
  async refresh(): Promise<void> {
    const token = ++this._loadToken;
    const kernelId = this.kernelId;
    if (!this._notebook) {
      this._setState('no-notebook', null, '');
      return;
    }
    if (!kernelId) {
      this._setState('no-kernel', null, '');
      return;
    }
    if (!this._listing || this._listing.kernel_id !== kernelId) {
      this._setState('loading', null, '');
    }
    try {
      const listing = await this._client.list(kernelId);
      if (token === this._loadToken) {
        this._setState('ready', listing, '');
      }
    } catch (error) {
      if (token === this._loadToken) {
        const notSandboxed = error instanceof ApiError && error.notSandboxed;
        this._setState(
          notSandboxed ? 'not-sandboxed' : 'unavailable',
          null,
          describeError(error)
        );
      }
    }
  }

  /** Take a snapshot of the followed kernel; `name` empty lets the server choose one. */
  async create(name = '', kind?: string, keep = false): Promise<ISnapshot | undefined> {
    if (name && !SNAPSHOT_NAME.test(name)) {
      this._finish('error', `“${name}” is not a valid snapshot name. ${NAME_HINT}`);
      return undefined;
    }
    const label = name ? `Creating snapshot “${name}”` : 'Creating a snapshot';
    return this._run(
      label,
      kernelId => this._client.create(kernelId, { name, kind, keep }),
      (snap, seconds) =>
        `Snapshot “${snap.name}” created (${snap.kind}, ${formatSize(snap.size)}) in ${seconds} s.`,
      'Snapshot failed'
    );
  }

  /** Roll the followed kernel back to snapshot `name`, after a confirmation unless told not to. */
  async rollback(name: string, options: { confirm?: boolean } = {}): Promise<boolean> {
    if (options.confirm !== false && !(await this._confirmRollback(name))) {
      return false;
    }
    const result = await this._run(
      `Rolling back to “${name}”`,
      async kernelId => {
        const outcome = await this._client.rollback(kernelId, name);
        if (outcome.kernel_restarted) {
          await this._greetRestartedKernel();
        }
        return outcome;
      },
      r =>
        `Rolled back to “${r.name}” in ${r.seconds.toFixed(1)} s. ` +
        (r.kernel_restarted
          ? 'The kernel restarted from the snapshot: its variables were reset.'
          : 'The kernel resumed with the memory of the snapshot.'),
      'Rollback failed'
    );
    return result !== undefined;
  }

  /** Delete snapshot `name`, after a confirmation unless told not to. */
  async remove(name: string, options: { confirm?: boolean } = {}): Promise<boolean> {
    if (options.confirm !== false) {
      const answer = await showDialog({
        title: 'Delete snapshot',
        body: `Delete snapshot ${name}? This cannot be undone.`,
        buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
      });
      if (!answer.button.accept) {
        return false;
      }
    }
    const result = await this._run(
      `Deleting snapshot “${name}”`,
      async kernelId => {
        await this._client.remove(kernelId, name);
        return name;
      },
      () => `Snapshot “${name}” deleted.`,
      'Delete failed'
    );
    return result !== undefined;
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.notebook = null;
    window.clearInterval(this._ticker);
    super.dispose();
  }

  // -- operations ---------------------------------------------------------------------------

  private async _run<T>(
    label: string,
    op: (kernelId: string) => Promise<T>,
    done: (result: T, seconds: string) => string,
    failure: string
  ): Promise<T | undefined> {
    const kernelId = this.kernelId;
    if (this._busy) {
      return undefined;
    }
    if (!kernelId) {
      this._finish('error', `${failure}: this notebook has no running kernel.`);
      return undefined;
    }
    const start = performance.now();
    this._busy = { label, start };
    this._result = null;
    this._ticker = window.setInterval(() => this._renderStatus(), 250);
    this._render();
    this._changed.emit();
    let result: T | undefined = undefined;
    let outcome: { state: 'done' | 'error'; text: string };
    try {
      result = await op(kernelId);
      const seconds = ((performance.now() - start) / 1000).toFixed(1);
      outcome = { state: 'done', text: done(result, seconds) };
    } catch (error) {
      outcome = { state: 'error', text: `${failure}: ${describeError(error)}` };
    }
    window.clearInterval(this._ticker);
    this._busy = null;
    await this.refresh();
    this._finish(outcome.state, outcome.text);
    return result;
  }

  private _finish(state: 'done' | 'error', text: string): void {
    this._result = { state, text };
    this._render();
    this._changed.emit();
  }

  private async _createFromForm(): Promise<void> {
    const name = this._dom.name.value.trim();
    const created = await this.create(
      name,
      this._dom.kind.value || undefined,
      this._dom.keep.checked
    );
    if (created) {
      this._dom.name.value = '';
      this._dom.keep.checked = false;
      this._renderForm();
    }
  }

  /**
   * After a rollback restarted the kernel behind the session's back, the last status the kernel
   * published is "starting", and JupyterLab ignores the status of kernel_info requests (they are
   * "untracked message types"). A harmless is_complete request makes the kernel publish a
   * busy/idle pair that every page showing this kernel, and the server, take as its status.
   */
  private async _greetRestartedKernel(): Promise<void> {
    const kernel = this._notebook?.sessionContext.session?.kernel;
    if (!kernel) {
      return;
    }
    let timer = 0;
    const timeout = new Promise<void>(resolve => {
      timer = window.setTimeout(resolve, KERNEL_GREETING_TIMEOUT_MS);
    });
    try {
      await Promise.race([kernel.requestIsComplete({ code: '' }), timeout]);
    } catch {
      // Not answering is shown by the next execution; the rollback itself succeeded.
    } finally {
      window.clearTimeout(timer);
    }
  }

  private async _confirmRollback(name: string): Promise<boolean> {
    const body = document.createElement('div');
    body.className = 'sk-confirm';
    const question = document.createElement('p');
    question.textContent = `Roll back kernel to ${name}? Variables defined after it are lost.`;
    body.appendChild(question);
    const snap = this._listing?.snapshots.find(s => s.name === name);
    const note = this._listing?.note;
    if (note && snap && !MEMORY_KINDS.has(snap.kind)) {
      const detail = document.createElement('p');
      detail.className = 'sk-confirm-note';
      detail.textContent = note;
      body.appendChild(detail);
    }
    const answer = await showDialog({
      title: 'Roll back',
      body: new Widget({ node: body }),
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Roll back' })]
    });
    return answer.button.accept;
  }

  private _onListClick(event: MouseEvent): void {
    const button = (event.target as HTMLElement).closest('button');
    const row = button?.closest<HTMLElement>('.sk-snapshot-row');
    const name = row?.dataset.name;
    if (!button || !name || button.disabled) {
      return;
    }
    if (button.classList.contains('sk-rollback')) {
      void this.rollback(name);
    } else if (button.classList.contains('sk-delete')) {
      void this.remove(name);
    }
  }

  // -- session tracking -----------------------------------------------------------------------

  private _onKernelChanged(): void {
    this._restarting = false;
    if (!this._busy) {
      this._result = null;
    }
    void this.refresh();
  }

  private _onStatusChanged(_: ISessionContext, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'starting') {
      this._restarting = true;
    } else if (status === 'idle' && this._restarting) {
      this._restarting = false;
      if (!this._busy) {
        void this.refresh();
      }
    }
  }

  private _onNotebookDisposed(): void {
    this.notebook = null;
  }

  // -- rendering ------------------------------------------------------------------------------

  private _setState(state: ViewState, listing: ISnapshotListing | null, error: string): void {
    this._state = state;
    this._listing = listing;
    this._error = error;
    this._render();
    this._changed.emit();
  }

  private _render(): void {
    const { root, message, kernel, sandbox, note } = this._dom;
    root.dataset.state = this._state;
    const ready = this._state === 'ready' && this._listing !== null;
    root.classList.toggle('sk-mod-ready', ready);

    message.replaceChildren(...messageFor(this._state, this._error));
    message.dataset.state = this._state;
    message.hidden = ready;

    const context = this._notebook?.sessionContext;
    kernel.textContent = context
      ? `${context.kernelDisplayName}${this._listing ? ` · ${this._listing.runtime}` : ''}`
      : 'No notebook';
    kernel.title = this.kernelId
      ? `Kernel ${this.kernelId}${this._listing ? ` (${this._listing.runtime} runtime)` : ''}`
      : '';
    sandbox.textContent = this._listing?.sandbox ?? '';
    sandbox.hidden = !ready || !this._listing?.sandbox;
    note.textContent = this._listing?.note ?? '';
    note.hidden = !ready || !this._listing?.note;
    this._dom.form.hidden = !ready;
    this._dom.listSection.hidden = !ready;

    this._renderKinds();
    this._renderForm();
    this._renderRows();
    this._renderStatus();
    this._refreshButton.enabled = !this._busy;
  }

  private _renderKinds(): void {
    const select = this._dom.kind;
    const kinds = this._listing?.kinds ?? [];
    const key = kinds.join(',');
    if (select.dataset.kinds !== key) {
      select.dataset.kinds = key;
      select.replaceChildren(
        ...kinds.map(kind => {
          const option = document.createElement('option');
          option.value = kind;
          option.textContent = kind;
          return option;
        })
      );
      if (this._listing?.default_kind) {
        select.value = this._listing.default_kind;
      }
    }
  }

  private _renderForm(): void {
    const { name, create, kind, keep, nameError } = this._dom;
    const value = name.value.trim();
    const valid = !value || SNAPSHOT_NAME.test(value);
    nameError.textContent = valid ? '' : NAME_HINT;
    nameError.hidden = valid;
    name.setAttribute('aria-invalid', String(!valid));
    const busy = this._busy !== null;
    name.disabled = busy;
    kind.disabled = busy;
    keep.disabled = busy;
    create.disabled = busy || !valid || this._state !== 'ready';
  }

  private _renderRows(): void {
    const { list, empty } = this._dom;
    // Newest first; snapshots of the same second keep the server's order (oldest first).
    const snaps = [...(this._listing?.snapshots ?? [])]
      .sort((a, b) => Date.parse(a.created) - Date.parse(b.created))
      .reverse();
    const busy = this._busy !== null;
    list.replaceChildren(...snaps.map(s => snapshotRow(s, busy)));
    list.setAttribute('aria-busy', String(busy));
    empty.hidden = snaps.length > 0;
  }

  private _renderStatus(): void {
    const { status } = this._dom;
    if (this._busy) {
      status.dataset.state = 'busy';
      const spinner = document.createElement('span');
      spinner.className = 'sk-spinner';
      spinner.setAttribute('aria-hidden', 'true');
      const text = document.createElement('span');
      text.className = 'sk-status-text';
      text.textContent = `${this._busy.label}\u2026`;
      const elapsed = document.createElement('span');
      elapsed.className = 'sk-elapsed';
      elapsed.textContent = formatElapsed(this._busy.start);
      status.replaceChildren(spinner, text, elapsed);
      status.hidden = false;
    } else if (this._result) {
      status.dataset.state = this._result.state;
      const text = document.createElement('span');
      text.className = 'sk-status-text';
      text.textContent = this._result.text;
      status.replaceChildren(text);
      status.hidden = false;
    } else {
      status.dataset.state = 'idle';
      status.replaceChildren();
      status.hidden = true;
    }
  }

  private _client: SnapshotClient;
  private _dom: IViewDom;
  private _refreshButton: ToolbarButton;
  private _notebook: NotebookPanel | null = null;
  private _state: ViewState = 'no-notebook';
  private _listing: ISnapshotListing | null = null;
  private _error = '';
  private _busy: { label: string; start: number } | null = null;
  private _result: { state: 'done' | 'error'; text: string } | null = null;
  private _ticker = 0;
  private _loadToken = 0;
  private _restarting = false;
  private _changed = new Signal<this, void>(this);
}

export namespace SnapshotPanel {
  /** The widget id, also the sidebar tab's `data-id`. */
  export const ID = 'sk-snapshots-panel';

  export interface IOptions {
    client: SnapshotClient;
  }
}

// -- DOM ------------------------------------------------------------------------------------

interface IViewDom {
  root: HTMLElement;
  kernel: HTMLElement;
  sandbox: HTMLElement;
  note: HTMLElement;
  message: HTMLElement;
  form: HTMLElement;
  name: HTMLInputElement;
  nameError: HTMLElement;
  kind: HTMLSelectElement;
  keep: HTMLInputElement;
  create: HTMLButtonElement;
  status: HTMLElement;
  listSection: HTMLElement;
  list: HTMLElement;
  empty: HTMLElement;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

function buildView(): IViewDom {
  const root = el('div');
  const kernel = el('div', 'sk-kernel');
  const sandbox = el('p', 'sk-sandbox');
  const note = el('p', 'sk-note');
  const message = el('div', 'sk-message');

  const form = el('div', 'sk-create');
  const name = el('input', 'jp-mod-styled sk-create-name');
  name.id = 'sk-create-name';
  name.type = 'text';
  name.placeholder = 'Name (optional)';
  name.spellcheck = false;
  name.autocomplete = 'off';
  name.maxLength = 63;
  name.setAttribute('aria-label', 'Snapshot name');
  const kind = el('select', 'sk-create-kind');
  kind.id = 'sk-create-kind';
  kind.title = 'Snapshot kind';
  kind.setAttribute('aria-label', 'Snapshot kind');
  const kindWrapper = el('div', 'jp-HTMLSelect jp-DefaultStyle sk-create-kind-wrapper');
  kindWrapper.append(
    kind,
    caretDownEmptyIcon.element({ tag: 'span', stylesheet: 'select', right: '4px', top: '5px' })
  );
  const keepLabel = el('label', 'sk-create-keep');
  const keep = el('input');
  keep.id = 'sk-create-keep';
  keep.type = 'checkbox';
  keepLabel.append(keep, document.createTextNode(' Keep after shutdown'));
  keepLabel.title = 'Keep the snapshot when the kernel shuts down';
  const create = el('button', 'jp-Button jp-mod-styled jp-mod-accept sk-create-button', 'Create');
  create.id = 'sk-create-button';
  create.type = 'button';
  const nameError = el('div', 'sk-name-error');
  nameError.setAttribute('role', 'alert');
  const row1 = el('div', 'sk-create-row');
  row1.append(name, kindWrapper);
  const row2 = el('div', 'sk-create-row');
  row2.append(keepLabel, create);
  form.append(row1, nameError, row2);

  const status = el('div', 'sk-status');
  status.setAttribute('role', 'status');
  status.setAttribute('aria-live', 'polite');

  const listSection = el('div', 'sk-list-section');
  const list = el('ul', 'sk-snapshot-list');
  const empty = el('p', 'sk-empty', 'No snapshots yet.');
  listSection.append(list, empty);

  root.append(kernel, sandbox, message, note, form, status, listSection);
  return {
    root,
    kernel,
    sandbox,
    note,
    message,
    form,
    name,
    nameError,
    kind,
    keep,
    create,
    status,
    listSection,
    list,
    empty
  };
}

function messageFor(state: ViewState, error: string): Node[] {
  const title = (text: string) => el('p', 'sk-message-title', text);
  const body = (text: string) => el('p', 'sk-message-body', text);
  switch (state) {
    case 'no-notebook':
      return [body("Open a notebook to snapshot its kernel's sandbox.")];
    case 'no-kernel':
      return [
        title('No kernel'),
        body('This notebook has no running kernel. Start a sandbox kernel to take snapshots.')
      ];
    case 'loading':
      return [body('Loading snapshots\u2026')];
    case 'not-sandboxed':
      return [title('This kernel is not sandboxed'), body(error)];
    case 'unavailable':
      return [title('Snapshots are unavailable'), body(error)];
    default:
      return [];
  }
}

function snapshotRow(snap: ISnapshot, busy: boolean): HTMLElement {
  const row = el('li', 'sk-snapshot-row');
  row.dataset.name = snap.name;
  row.dataset.kind = snap.kind;

  const main = el('div', 'sk-snapshot-main');
  const name = el('span', 'sk-snapshot-name', snap.name);
  name.title = snap.name;
  const kind = el('span', `sk-badge sk-snapshot-kind sk-kind-${snap.kind}`, snap.kind);
  main.append(name, kind);
  if (snap.keep) {
    const keep = el('span', 'sk-badge sk-snapshot-keep', 'kept');
    keep.title = 'Kept when the kernel shuts down';
    main.append(keep);
  }

  const meta = el('div', 'sk-snapshot-meta');
  const created = formatCreated(snap.created);
  const time = el('time', 'sk-snapshot-created', created.text);
  time.dateTime = snap.created;
  time.title = created.title;
  const size = el('span', 'sk-snapshot-size', formatSize(snap.size));
  meta.append(time, el('span', 'sk-sep', '\u00b7'), size);

  const actions = el('div', 'sk-snapshot-actions');
  const rollback = el('button', 'jp-Button jp-mod-styled sk-rollback', 'Roll back');
  rollback.type = 'button';
  rollback.title = `Roll the kernel back to ${snap.name}`;
  const remove = el('button', 'jp-Button jp-mod-styled jp-mod-minimal sk-delete');
  remove.type = 'button';
  remove.title = `Delete snapshot ${snap.name}`;
  remove.setAttribute('aria-label', `Delete snapshot ${snap.name}`);
  remove.append(deleteIcon.element({ tag: 'span', elementPosition: 'center' }));
  rollback.disabled = busy;
  remove.disabled = busy;
  actions.append(rollback, remove);

  row.append(main, meta, actions);
  return row;
}
