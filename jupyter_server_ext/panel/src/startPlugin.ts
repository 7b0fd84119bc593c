/**
 * The plugin that shows sandbox kernels' start progress (see `startStatus.ts`): it listens to
 * the server's event stream and feeds the kernel-start events to the status bar item.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IStatusBar } from '@jupyterlab/statusbar';

import { IStartEvent, StartStatus, isStartEvent } from './startStatus';

export const startStatusPlugin: JupyterFrontEndPlugin<void> = {
  id: 'sandbox-kernels-panel:start-status',
  description: 'Show the phases of a sandbox kernel start, and its error if it fails.',
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const specs = app.serviceManager.kernelspecs;
    const status = new StartStatus({
      displayName: name => specs.specs?.kernelspecs[name]?.display_name ?? ''
    });
    // Without a status bar (a custom shell), failures still come as notifications.
    statusBar?.registerStatusItem(startStatusPlugin.id, {
      item: status,
      align: 'left',
      rank: 1000,
      isActive: () => true
    });
    app.serviceManager.events.stream.connect((_, emission) => {
      if (isStartEvent(emission)) {
        status.handle(emission as unknown as IStartEvent);
      }
    });
  }
};
