// Frame-time measurement: requestAnimationFrame deltas (what the wall shows) and the time our own
// drawing took, over a sliding window of the last 600 frames; long tasks from PerformanceObserver.
// Published as window.__dispatchPerf = {frames, p50_ms, p95_ms, max_ms, fps, draw_p50_ms,
// draw_p95_ms, draw_max_ms, long_tasks, window}.

const N = 600;

export class Perf {
  constructor() {
    this.delta = new Float64Array(N);
    this.work = new Float64Array(N);
    this.i = 0; this.filled = 0; this.frames = 0; this.last = 0;
    this.longTasks = 0; this.longestTask = 0;
    try {
      const po = new PerformanceObserver((list) => {
        for (const e of list.getEntries()) { this.longTasks++; this.longestTask = Math.max(this.longestTask, e.duration); }
      });
      const types = PerformanceObserver.supportedEntryTypes || [];
      if (types.includes('long-animation-frame')) po.observe({ type: 'long-animation-frame', buffered: false });
      else if (types.includes('longtask')) po.observe({ type: 'longtask', buffered: false });
    } catch { /* not supported */ }
    this.publish();
    window.__dispatchPerfReset = () => this.reset();
  }

  reset() {
    this.i = 0; this.filled = 0; this.frames = 0; this.last = 0; this.longTasks = 0; this.longestTask = 0;
    this.publish();
  }

  /** Call once per animation frame with the rAF timestamp and the ms our work took. */
  frame(now, workMs) {
    if (this.last && !document.hidden) {
      const dt = now - this.last;
      if (dt < 1000) {
        this.delta[this.i] = dt; this.work[this.i] = workMs;
        this.i = (this.i + 1) % N; this.filled = Math.min(N, this.filled + 1);
        this.frames++;
      }
    }
    this.last = now;
  }

  publish() {
    const n = this.filled;
    const d = Array.from(this.delta.subarray(0, n)).sort((a, b) => a - b);
    const w = Array.from(this.work.subarray(0, n)).sort((a, b) => a - b);
    const q = (a, p) => (a.length ? a[Math.min(a.length - 1, Math.floor(p * a.length))] : null);
    const r = (x) => (x == null ? null : Math.round(x * 100) / 100);
    const p50 = q(d, 0.5);
    window.__dispatchPerf = {
      frames: this.frames, window: n,
      p50_ms: r(p50), p95_ms: r(q(d, 0.95)), max_ms: r(n ? d[n - 1] : null),
      fps: p50 ? Math.round(1000 / p50) : null,
      draw_p50_ms: r(q(w, 0.5)), draw_p95_ms: r(q(w, 0.95)), draw_max_ms: r(n ? w[n - 1] : null),
      long_tasks: this.longTasks, longest_task_ms: r(this.longestTask),
    };
    return window.__dispatchPerf;
  }
}
