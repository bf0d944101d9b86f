package worker

import (
	"context"
	"net/http"
	"time"
)

func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", d.healthz)
	mux.HandleFunc("GET /readyz", d.readyz)
	mux.HandleFunc("GET /recover/{token}", d.recoverLink)
	mux.HandleFunc("GET /recover/done", d.recoverDone)
	mux.HandleFunc("GET /recover/canceled", d.recoverCanceled)
	return mux
}

// healthz answers 200 while the process is up.
func (d *Daemon) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("ok\n"))
}

// readyz answers 200 when the database answers and the River client is running, 503 otherwise.
func (d *Daemon) readyz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if !d.ready.Load() {
		http.Error(w, "not ready: job client not running", http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := d.pool.Ping(ctx); err != nil {
		http.Error(w, "not ready: database unreachable", http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ready\n"))
}
