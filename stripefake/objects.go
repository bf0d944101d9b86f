package stripefake

import "time"

// Stored objects. Their metadata maps are never changed after they are set
// (an update replaces the map), so a rendered object may share them and be
// encoded after the state lock is released.

type customer struct {
	id          string
	created     int64
	email       string
	name        string
	description string
	phone       string
	metadata    map[string]string
	defaultPM   string
}

type paymentMethod struct {
	id       string
	created  int64
	token    string // the pm_card_* token it was made from
	card     *testCard
	expMonth int64
	expYear  int64
	customer string
	metadata map[string]string
	// used marks an unattached PaymentMethod that paid once; Stripe refuses
	// to use it again. detached marks one detached from its customer.
	used     bool
	detached bool
}

type charge struct {
	id       string
	created  int64
	amount   int64
	refunded int64
	currency string
	customer string
	pi       string
	pm       string
	status   string // succeeded | failed
	failure  *cardDecline
}

// Payment statuses.
const (
	piRequiresPaymentMethod = "requires_payment_method"
	piRequiresConfirmation  = "requires_confirmation"
	piRequiresAction        = "requires_action"
	piSucceeded             = "succeeded"
	piCanceled              = "canceled"
)

type paymentIntent struct {
	id                 string
	created            int64
	createdAt          time.Time
	amount             int64
	amountReceived     int64
	currency           string
	customer           string
	description        string
	metadata           map[string]string
	pm                 string
	status             string
	latestCharge       string
	lastErr            *apiError
	setupFutureUsage   string
	descriptorSuffix   string
	pmTypes            []string
	clientSecret       string
	canceledAt         int64
	cancellationReason string
}

type setupIntent struct {
	id           string
	created      int64
	customer     string
	pm           string
	status       string
	usage        string
	description  string
	metadata     map[string]string
	lastErr      *apiError
	clientSecret string
	pmTypes      []string
}

type lineItem struct {
	name       string
	currency   string
	unitAmount int64
	quantity   int64
}

// Checkout Session states.
const (
	sessionOpen     = "open"
	sessionComplete = "complete"
	sessionExpired  = "expired"
)

type session struct {
	id                string
	created           int64
	expiresAt         int64
	mode              string // payment | setup
	status            string
	paymentStatus     string
	customer          string
	customerEmail     string
	currency          string
	successURL        string
	cancelURL         string
	clientReferenceID string
	locale            string
	metadata          map[string]string
	lineItems         []lineItem
	amountTotal       int64
	piMetadata        map[string]string
	piDescription     string
	setupFutureUsage  string
	siMetadata        map[string]string
	siDescription     string
	tosRequired       bool
	tosMessage        string
	submitMessage     string
	pmTypes           []string
	pi                string
	si                string
	consentAccepted   bool
	url               string
}

type refund struct {
	id       string
	created  int64
	amount   int64
	currency string
	pi       string
	charge   string
	reason   string
	metadata map[string]string
}
