package worker

import (
	"context"
	"crypto/subtle"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"riverqueue.com/riverui"

	"github.com/billingd/billingd/internal/metrics"
)

func (d *Daemon) routes() (http.Handler, error) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", d.healthz)
	mux.HandleFunc("GET /readyz", d.readyz)
	mux.HandleFunc("GET /recover/{token}", d.recoverLink)
	mux.HandleFunc("GET /recover/done", d.recoverDone)
	mux.HandleFunc("GET /recover/canceled", d.recoverCanceled)
	mux.Handle("POST /webhooks/stripe", d.hooks)
	mux.HandleFunc("GET /setup/{result}", setupReturn)
	// The process's counters plus this daemon's database gauges (a registry of its own, so that
	// several daemons in one process, as in tests and the demo, do not collide).
	local := prometheus.NewRegistry()
	local.MustRegister(newDBCollector(d.pool, d.logger))
	mux.Handle("GET /metrics", promhttp.HandlerFor(prometheus.Gatherers{metrics.Registry, local}, promhttp.HandlerOpts{}))
	if d.cfg.RiverUIUser != "" {
		ui, err := riverui.NewHandler(&riverui.HandlerOpts{
			Endpoints: riverui.NewEndpoints(d.river, nil),
			Logger:    d.logger,
			Prefix:    "/riverui",
			// Job args hold only ids, but hide them by default all the same.
			JobListHideArgsByDefault: true,
		})
		if err != nil {
			return nil, fmt.Errorf("river ui: %w", err)
		}
		d.riverUI = ui
		mux.Handle("/riverui/", basicAuth(d.cfg.RiverUIUser, d.cfg.RiverUIPass, ui))
	}
	return mux, nil
}

// basicAuth guards h with HTTP basic authentication, comparing in constant time.
func basicAuth(user, pass string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		if !ok || subtle.ConstantTimeCompare([]byte(u), []byte(user)) != 1 ||
			subtle.ConstantTimeCompare([]byte(p), []byte(pass)) != 1 {
			w.Header().Set("WWW-Authenticate", `Basic realm="billingd", charset="UTF-8"`)
			http.Error(w, "authentication required", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
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

// setupReturn is where the hosted setup page sends the customer back when the application set no
// BILLING_SETUP_SUCCESS_URL / BILLING_SETUP_CANCEL_URL (useful with `billingd setup`).
func setupReturn(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	switch r.PathValue("result") {
	case "done":
		_, _ = w.Write([]byte("Thank you: your payment method is being saved. You can close this page.\n"))
	case "canceled":
		_, _ = w.Write([]byte("No payment method was saved. You can close this page.\n"))
	default:
		http.NotFound(w, r)
	}
}
