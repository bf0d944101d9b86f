package jobs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertype"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
)

// StartSetupArgs asks for the hosted Checkout Session (mode=setup) of one setup session to be
// created. billing.start_setup inserts it from SQL as {"setup_session_id": N}, kind 'start_setup',
// queue 'default': keep the three stable.
type StartSetupArgs struct {
	SetupSessionID int64 `json:"setup_session_id"`
}

// Kind is the job kind, also used by billing.start_setup in SQL.
func (StartSetupArgs) Kind() string { return "start_setup" }

// InsertOpts matches what billing.start_setup inserts.
func (StartSetupArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 10}
}

// StartSetupWorker creates the Stripe customer when the customer has none, then a hosted
// Checkout Session in mode=setup that shows the terms of the session's version, and stores its URL
// and expiry ('open'); the status change is announced on channel billing_setup by a trigger in the
// same transaction.
//
// Running it twice creates one customer and one session: each Stripe call carries an idempotency
// key derived from the database row it is for (the customer, the setup session), the Stripe ids
// are stored only where none is stored yet, and a session that is no longer 'creating' is left
// alone. After Stripe answered a 5xx, which it replays under the same key for 24 hours, the keys
// move to a new generation (keyGeneration). Stripe's refusal of the request (HTTP 400) or the last attempt's failure marks the setup
// session 'failed' with the reason, which is announced too, so that no one waits for a URL forever.
type StartSetupWorker struct {
	river.WorkerDefaults[StartSetupArgs]
	deps *Deps
}

// setupToStart is a setup session being created, with its customer and terms.
type setupToStart struct {
	id, customerID                      int64
	status, termsVersion, currency      string
	usage                               []string
	customerRef                         string
	email, stripeCustomer, stripeAcct   *string
	agreement, timing, amount, canceled string
}

const loadSetupToStartQuery = `
select s.id, s.status, s.usage, s.terms_version, s.currency,
       c.id, c.customer_ref, c.email, c.stripe_customer_id, c.stripe_account_id,
       t.agreement, t.timing, t.amount_basis, t.cancellation_policy
from billing.setup_sessions s
join billing.customers c on c.id = s.customer_id
join billing.terms t on t.version = s.terms_version
where s.id = $1`

const (
	setStripeCustomerQuery = `
update billing.customers set stripe_customer_id = $2, updated_at = now()
where id = $1 and stripe_customer_id is null`

	openSetupSessionQuery = `
update billing.setup_sessions
set status = 'open', checkout_session_id = $2, url = $3, expires_at = $4, last_error = null
where id = $1 and status = 'creating'`

	failSetupSessionQuery = `
update billing.setup_sessions set status = 'failed', last_error = $2
where id = $1 and status = 'creating'`
)

// Work creates the session of the setup session named by the job.
func (w *StartSetupWorker) Work(ctx context.Context, job *river.Job[StartSetupArgs]) error {
	s, err := w.load(ctx, job.Args.SetupSessionID)
	if err != nil {
		return err
	}
	if s == nil {
		return river.JobCancel(fmt.Errorf("setup session %d does not exist", job.Args.SetupSessionID))
	}
	log := w.deps.Logger.With("setup_session_id", s.id, "customer_id", s.customerID, "job_id", job.ID)
	if s.status != "creating" {
		log.Debug("setup session already started", "status", s.status)
		return nil
	}
	if w.deps.Stripe == nil {
		return errors.New("no Stripe client configured")
	}

	cs, err := w.createSession(ctx, s, keyGeneration(job.Errors))
	if err != nil {
		var reason string
		var se *stripe.Error
		switch {
		case errors.As(err, &se) && se.HTTPStatusCode == 400:
			reason = fmt.Sprintf("Stripe refused the request: %s %s", se.Code, se.Msg)
		case errors.Is(err, errNoAccount):
			reason = err.Error()
		case job.Attempt >= job.MaxAttempts:
			reason = "gave up after " + strconv.Itoa(job.Attempt) + " attempts: " + err.Error()
		default:
			return err // transient: River retries, with the same idempotency keys
		}
		log.Error("setup session failed", "error", err)
		return w.finish(ctx, job, failSetupSessionQuery, s.id, reason)
	}
	if err := w.finish(ctx, job, openSetupSessionQuery, s.id, cs.ID, cs.URL, time.Unix(cs.ExpiresAt, 0).UTC()); err != nil {
		return err
	}
	log.Info("setup session open", "checkout_session_id", cs.ID)
	return nil
}

// finish writes the session's new state and completes the job in one transaction.
func (w *StartSetupWorker) finish(ctx context.Context, job *river.Job[StartSetupArgs], query string, args ...any) error {
	return pgx.BeginFunc(ctx, w.deps.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, query, args...); err != nil {
			return fmt.Errorf("update setup session %d: %w", job.Args.SetupSessionID, err)
		}
		if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
			return fmt.Errorf("complete start_setup job: %w", err)
		}
		return nil
	})
}

func (w *StartSetupWorker) load(ctx context.Context, id int64) (*setupToStart, error) {
	var s setupToStart
	err := w.deps.Pool.QueryRow(ctx, loadSetupToStartQuery, id).Scan(&s.id, &s.status, &s.usage, &s.termsVersion, &s.currency,
		&s.customerID, &s.customerRef, &s.email, &s.stripeCustomer, &s.stripeAcct,
		&s.agreement, &s.timing, &s.amount, &s.canceled)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load setup session %d: %w", id, err)
	}
	return &s, nil
}

// errNoAccount: in the Accounts v2 model billingd cannot create the Account (stripe-go v82 has no
// Accounts v2 API); the application links one first.
var errNoAccount = errors.New("BILLING_STRIPE_CUSTOMER_MODEL=account and the customer has no Stripe Account: link one with billing.set_stripe_account first")

// createSession makes sure the customer exists at Stripe and creates the Checkout Session, with
// idempotency keys of key generation gen (see keyGeneration).
func (w *StartSetupWorker) createSession(ctx context.Context, s *setupToStart, gen int) (*stripe.CheckoutSession, error) {
	installation, err := w.deps.Installation(ctx)
	if err != nil {
		return nil, fmt.Errorf("create checkout session for setup session %d: %w", s.id, err)
	}
	// The four things the terms must cover, shown next to the required terms checkbox.
	terms := strings.Join([]string{s.agreement, s.timing, s.amount, s.canceled}, " ")
	successURL := cmp.Or(w.deps.Config.SetupSuccessURL, strings.TrimRight(w.deps.Config.PublicURL, "/")+"/setup/done")
	cancelURL := cmp.Or(w.deps.Config.SetupCancelURL, strings.TrimRight(w.deps.Config.PublicURL, "/")+"/setup/canceled")
	meta := map[string]string{
		"setup_session_id":            strconv.FormatInt(s.id, 10),
		stripeapi.MetadataCustomerRef: s.customerRef,
		"usage":                       strings.Join(s.usage, ","),
		"terms_version":               s.termsVersion,
	}
	var params *stripe.CheckoutSessionCreateParams
	if w.deps.Config.StripeCustomerModel == "account" {
		if s.stripeAcct == nil {
			return nil, errNoAccount
		}
		params = stripeapi.OnboardingSessionForAccount(installation, s.id, *s.stripeAcct, s.currency, successURL, cancelURL, meta, terms)
	} else {
		id, err := w.ensureCustomer(ctx, s, installation, gen)
		if err != nil {
			return nil, err
		}
		params = stripeapi.OnboardingSession(installation, s.id, id, s.currency, successURL, cancelURL, meta, terms)
	}
	nextGeneration(params.IdempotencyKey, gen)
	cs, err := w.deps.Stripe.V1CheckoutSessions.Create(ctx, params)
	if err != nil {
		return nil, fmt.Errorf("create checkout session for setup session %d: %s%w", s.id, serverErrorMark(err), err)
	}
	return cs, nil
}

// ensureCustomer returns the customer's Stripe Customer id, creating the Customer when there is
// none. The idempotency key names the installation and the customer (its customer_ref), so a
// retry, or two setups of the same customer at once, get the same Customer back, and another
// installation's customer of the same customer_ref is never returned.
func (w *StartSetupWorker) ensureCustomer(ctx context.Context, s *setupToStart, installation string, gen int) (string, error) {
	if s.stripeCustomer != nil {
		return *s.stripeCustomer, nil
	}
	params := stripeapi.CustomerCreate(installation, s.customerRef, deref(s.email))
	nextGeneration(params.IdempotencyKey, gen)
	c, err := w.deps.Stripe.V1Customers.Create(ctx, params)
	if err != nil {
		return "", fmt.Errorf("create Stripe customer for customer %d: %s%w", s.customerID, serverErrorMark(err), err)
	}
	if _, err := w.deps.Pool.Exec(ctx, setStripeCustomerQuery, s.customerID, c.ID); err != nil {
		return "", fmt.Errorf("store Stripe customer of customer %d: %w", s.customerID, err)
	}
	var stored string
	if err := w.deps.Pool.QueryRow(ctx, `select stripe_customer_id from billing.customers where id = $1`, s.customerID).Scan(&stored); err != nil {
		return "", fmt.Errorf("read Stripe customer of customer %d: %w", s.customerID, err)
	}
	return stored, nil
}

// setupSessionRequest is what a setup Checkout Session is made of.
type setupSessionRequest struct {
	SetupSessionID        int64
	CustomerRef           string
	Customer, Account     string // one of them
	Currency              string
	Usage                 []string
	TermsVersion          string
	TermsText             string
	SuccessURL, CancelURL string
}

// stripe5xx marks, in a job's recorded errors, an attempt that Stripe answered with a 5xx.
const stripe5xx = "[stripe 5xx] "

func serverErrorMark(err error) string {
	var se *stripe.Error
	if errors.As(err, &se) && se.HTTPStatusCode >= 500 {
		return stripe5xx
	}
	return ""
}

// keyGeneration counts the job's earlier attempts that Stripe answered with a 5xx. Stripe stores
// a 5xx under its idempotency key and replays it for 24 hours, so a retry with the same key could
// never succeed: each such answer moves the keys to a new generation. Any other failure (a lost
// connection, a 409, a 429) keeps the generation, so its retry replays the stored result. The cost
// of a 5xx that came after Stripe did the work is one orphan object at Stripe (an unused Customer
// or an open Checkout Session that expires unseen), never a second one in billingd.
func keyGeneration(errs []rivertype.AttemptError) int {
	n := 0
	for _, e := range errs {
		if strings.Contains(e.Error, stripe5xx) {
			n++
		}
	}
	return n
}

// nextGeneration suffixes an idempotency key with its generation, when past the first.
func nextGeneration(key *string, gen int) {
	if key != nil && gen > 0 {
		*key += ":gen" + strconv.Itoa(gen)
	}
}
