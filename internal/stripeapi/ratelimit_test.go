package stripeapi_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/stripeapi"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// Two limiters on one database stand for two replicas: together they stay under the rate, and
// the rate is still used (a per-process limiter would let twice as much through).
func TestLimiterHoldsAcrossReplicas(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewDB(t)
	const rps = 40.0
	const run = 2500 * time.Millisecond
	a, err := stripeapi.NewLimiter(dbtest.Pool(t, dbURL), "stripe", rps)
	require.NoError(t, err)
	b, err := stripeapi.NewLimiter(dbtest.Pool(t, dbURL), "stripe", rps)
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()
	var (
		mu     sync.Mutex
		grants []time.Time
		per    [2]int
		wg     sync.WaitGroup
	)
	for i, l := range []*stripeapi.Limiter{a, b} {
		for range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					if err := l.Wait(ctx); err != nil {
						require.ErrorIs(t, err, context.DeadlineExceeded)
						return
					}
					mu.Lock()
					grants = append(grants, time.Now())
					per[i]++
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()

	limit := rps * run.Seconds()
	require.LessOrEqual(t, float64(len(grants)), limit+2, "both replicas together stay under %v/s", rps)
	require.GreaterOrEqual(t, float64(len(grants)), 0.7*limit, "the rate is used, not starved")
	require.Greater(t, per[0], len(grants)/4, "replica a got its share")
	require.Greater(t, per[1], len(grants)/4, "replica b got its share")

	slices.SortFunc(grants, func(x, y time.Time) int { return x.Compare(y) })
	worst := 0
	for i := range grants {
		j, _ := slices.BinarySearchFunc(grants, grants[i].Add(time.Second), func(x, end time.Time) int { return x.Compare(end) })
		worst = max(worst, j-i)
	}
	// Sleeps overshoot on a busy machine, which can only bunch requests by the overshoot.
	require.LessOrEqual(t, worst, int(rps*1.1)+2, "no one-second window holds more than the rate")
}

func TestLimiterNamesAreSeparate(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	slow, err := stripeapi.NewLimiter(pool, "slow", 2)
	require.NoError(t, err)
	fast, err := stripeapi.NewLimiter(pool, "fast", 1000)
	require.NoError(t, err)
	ctx := context.Background()
	first := time.Now()
	require.NoError(t, slow.Wait(ctx))
	start := time.Now()
	for range 20 {
		require.NoError(t, fast.Wait(ctx))
	}
	require.Less(t, time.Since(start), 400*time.Millisecond, "another name's pace does not apply")
	require.NoError(t, slow.Wait(ctx))
	require.Greater(t, time.Since(first), 450*time.Millisecond, "2/s: the second request comes 500 ms after the first")
}

func TestNewLimiterRejectsBadRates(t *testing.T) {
	t.Parallel()
	for _, rps := range []float64{0, -1} {
		_, err := stripeapi.NewLimiter(nil, "stripe", rps)
		require.Error(t, err)
	}
}

func TestRateLimitedTransportPacesEveryRequest(t *testing.T) {
	t.Parallel()
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	defer srv.Close()
	l, err := stripeapi.NewLimiter(dbtest.NewPool(t), "stripe", 10)
	require.NoError(t, err)
	client := &http.Client{Transport: stripeapi.RateLimitedTransport(nil, l)}
	start := time.Now()
	for range 6 {
		resp, err := client.Get(srv.URL)
		require.NoError(t, err)
		resp.Body.Close()
	}
	require.Equal(t, int64(6), hits.Load())
	require.Greater(t, time.Since(start), 450*time.Millisecond, "six requests at 10/s take at least 500 ms")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
	require.NoError(t, err)
	_, err = client.Do(req)
	require.Error(t, err)
	require.Equal(t, int64(6), hits.Load(), "a request whose context ended is not sent")
}
