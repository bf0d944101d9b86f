package jobs_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"
	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/worker"
)

const webhookSecret = "whsec_test_ingest_secret"

// harness is a migrated database, billingd's River client (running, with every worker), and the
// webhook handler served over HTTP, as the daemon wires them.
type harness struct {
	pool   *pgxpool.Pool
	cfg    *config.Config
	client *river.Client[pgx.Tx]
	hooks  *httptest.Server
}

type harnessOpts struct {
	stripe *stripe.Client
	// configure changes the settings before the client is built.
	configure func(*config.Config)
}

func newHarness(t *testing.T, o harnessOpts) *harness {
	t.Helper()
	pool := dbtest.NewPool(t)
	cfg := &config.Config{}
	require.NoError(t, config.NewFlagSet("test", cfg, func(string) string { return "" }).Parse(nil))
	cfg.StripeWebhookSecret = webhookSecret
	cfg.FetchCooldown = 5 * time.Millisecond
	cfg.SoftStopTimeout = 2 * time.Second
	if o.configure != nil {
		o.configure(cfg)
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	client, err := worker.NewRiverClient(pool, cfg, &jobs.Deps{Pool: pool, Stripe: o.stripe, Logger: logger, Config: cfg})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	require.NoError(t, client.Start(ctx))
	t.Cleanup(func() {
		stopCtx, stop := context.WithTimeout(context.Background(), 5*time.Second)
		defer stop()
		_ = client.StopAndCancel(stopCtx)
		cancel()
	})
	hooks := httptest.NewServer(worker.NewWebhooks(pool, client, webhookSecret, logger))
	t.Cleanup(hooks.Close)
	return &harness{pool: pool, cfg: cfg, client: client, hooks: hooks}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// eventJSON returns a Stripe event of the given id, type and creation time about object.
func eventJSON(t *testing.T, id, typ string, created time.Time, object any) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{
		"id": id, "object": "event", "api_version": stripe.APIVersion, "created": created.Unix(),
		"type": typ, "livemode": false, "pending_webhooks": 1,
		"data": map[string]any{"object": object},
	})
	require.NoError(t, err)
	return b
}

// deliver posts a signed event to the webhook handler, as Stripe does, and requires a 2xx.
func (h *harness) deliver(t *testing.T, body []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, h.hooks.URL, bytes.NewReader(body))
	require.NoError(t, err)
	sig := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: body, Secret: webhookSecret})
	req.Header.Set("Stripe-Signature", sig.Header)
	resp, err := h.hooks.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

// waitJobs waits until no job of the given kinds is waiting or running: each has completed, was
// cancelled or discarded, or failed once and waits for its retry.
func (h *harness) waitJobs(t *testing.T, kinds ...string) {
	t.Helper()
	require.Eventually(t, func() bool {
		var n int
		err := h.pool.QueryRow(context.Background(), `select count(*) from river_job
			where kind = any($1) and state not in ('completed', 'cancelled', 'discarded')
			  and not (state = 'retryable' and cardinality(errors) > 0)`, kinds).Scan(&n)
		return err == nil && n == 0
	}, 20*time.Second, 10*time.Millisecond)
}

// waitCompleted waits until n jobs of kind have completed.
func (h *harness) waitCompleted(t *testing.T, kind string, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		var done int
		err := h.pool.QueryRow(context.Background(), `select count(*) from river_job where kind = $1 and state = 'completed'`, kind).Scan(&done)
		return err == nil && done >= n
	}, 30*time.Second, 10*time.Millisecond)
}

// eventStatus returns the status and note of a stored event.
func (h *harness) eventStatus(t *testing.T, id string) (status, note string) {
	t.Helper()
	var n *string
	require.NoError(t, h.pool.QueryRow(context.Background(),
		`select status, note from billing.webhook_events where id = $1`, id).Scan(&status, &n))
	if n != nil {
		note = *n
	}
	return status, note
}
