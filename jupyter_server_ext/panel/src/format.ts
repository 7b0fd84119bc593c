/**
 * Small formatting helpers for the panel.
 */
import { Time } from '@jupyterlab/coreutils';

/** Bytes as a short human size ("148 MB"), or an em dash when unknown. */
export function formatSize(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) {
    return '\u2014';
  }
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** A creation time as "3 min. ago"; `title` holds the full local date and time. */
export function formatCreated(iso: string): { text: string; title: string } {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) {
    return { text: iso, title: iso };
  }
  return { text: Time.formatHuman(date, 'short'), title: date.toLocaleString() };
}

/** Seconds since `start` (a `performance.now()` value), as "12 s". */
export function formatElapsed(start: number): string {
  return `${Math.floor((performance.now() - start) / 1000)} s`;
}
