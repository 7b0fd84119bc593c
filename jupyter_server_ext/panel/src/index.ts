/**
 * sandbox-kernels-panel: a sidebar and palette commands to snapshot and roll back the sandbox
 * of the current notebook's kernel, through the `jupyter_server_ext` REST API; and a status
 * bar item with the phases of a sandbox kernel's start (`startPlugin.ts`).
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, InputDialog, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';

import { SNAPSHOT_NAME, SnapshotClient } from './api';
import { snapshotIcon } from './icon';
import { SnapshotPanel } from './panel';
import { PoolSection } from './poolSection';
import { startStatusPlugin } from './startPlugin';

export { SnapshotClient } from './api';
export { SnapshotPanel } from './panel';

/** Command ids. */
export namespace CommandIDs {
  export const create = 'sandbox-kernels:create-snapshot';
  export const rollbackLatest = 'sandbox-kernels:rollback-latest';
  export const showPanel = 'sandbox-kernels:show-snapshots';
}

const CATEGORY = 'Sandbox';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'sandbox-kernels-panel:plugin',
  description: 'Snapshot and roll back the sandbox of a notebook kernel.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const client = new SnapshotClient(app.serviceManager.serverSettings);
    const panel = new SnapshotPanel({ client });
    const specs = app.serviceManager.kernelspecs;
    panel.addWidget(
      new PoolSection({
        settings: app.serviceManager.serverSettings,
        displayName: name => specs.specs?.kernelspecs[name]?.display_name ?? ''
      })
    );
    app.shell.add(panel, 'right', { rank: 650, type: 'Sandbox snapshots' });
    restorer?.add(panel, SnapshotPanel.ID);

    panel.notebook = tracker.currentWidget;
    tracker.currentChanged.connect((_, notebook) => {
      panel.notebook = notebook;
    });

    const { commands } = app;
    const canOperate = () => panel.kernelId !== null && !panel.busy;
    const show = () => app.shell.activateById(panel.id);
    panel.changed.connect(() => {
      commands.notifyCommandChanged(CommandIDs.create);
      commands.notifyCommandChanged(CommandIDs.rollbackLatest);
    });

    commands.addCommand(CommandIDs.showPanel, {
      label: 'Sandbox: Show snapshots panel',
      caption: 'Show the snapshots of the current notebook kernel’s sandbox',
      icon: snapshotIcon,
      execute: show
    });

    commands.addCommand(CommandIDs.create, {
      label: 'Sandbox: Create snapshot',
      caption: 'Snapshot the sandbox of the current notebook kernel',
      icon: snapshotIcon,
      isEnabled: canOperate,
      execute: async args => {
        let name = typeof args.name === 'string' ? args.name : undefined;
        if (name === undefined) {
          const answer = await InputDialog.getText({
            title: 'Create snapshot',
            label: 'Name (leave empty for a generated one)',
            placeholder: 'e.g. before-training',
            okLabel: 'Create'
          });
          if (!answer.button.accept) {
            return;
          }
          name = (answer.value ?? '').trim();
        }
        if (name && !SNAPSHOT_NAME.test(name)) {
          await showErrorMessage(
            'Invalid snapshot name',
            `“${name}” is not a valid snapshot name: use letters, digits, '.', '_' or '-', ` +
              'starting with a letter or digit (at most 63).'
          );
          return;
        }
        show();
        const kind = typeof args.kind === 'string' ? args.kind : undefined;
        return panel.create(name, kind, args.keep === true);
      }
    });

    commands.addCommand(CommandIDs.rollbackLatest, {
      label: 'Sandbox: Roll back to latest snapshot',
      caption: 'Roll the current notebook kernel back to its newest snapshot',
      icon: snapshotIcon,
      isEnabled: canOperate,
      execute: async () => {
        show();
        await panel.refresh();
        const latest = panel.latest;
        if (panel.state !== 'ready') {
          return; // the panel shows why (not sandboxed, no kernel, server error)
        }
        if (!latest) {
          await showErrorMessage(
            'No snapshot',
            'This kernel has no snapshot yet: create one first (Sandbox: Create snapshot).'
          );
          return;
        }
        return panel.rollback(latest.name);
      }
    });

    if (palette) {
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category: CATEGORY });
      }
    }
  }
};

export default [plugin, startStatusPlugin];
